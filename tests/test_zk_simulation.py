"""The commitment layer inside real federated runs: verification before aggregation, ledger, audit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from finlora.common.io import read_jsonl_records
from tests.conftest import run_cli


def test_zk_run_is_auditable_and_tampering_is_caught(fedavg_run, tmp_path):
    """fedavg_run has zk on (the default): its ledger audits OK; a changed global adapter value fails."""
    assert fedavg_run["proc"].returncode == 0
    run_dir = fedavg_run["run_dir"]
    ledger = read_jsonl_records(run_dir / "ledger.jsonl")
    assert ledger[0]["type"] == "header" and [e["round"] for e in ledger[1:]] == [1, 2]
    assert all(len(e["clients"]) == 3 and not e["rejected"] for e in ledger[1:])
    audit = run_cli("zk", "audit", str(run_dir), "--keys", str(run_dir / "keys"))
    assert audit.returncode == 0, audit.stdout + audit.stderr

    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered)
    adapter = tampered / "round-2" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] += np.float32(1e-3)
    save_file(tensors, str(adapter), metadata={"format": "pt"})
    bad = run_cli("zk", "audit", str(tampered), "--keys", str(run_dir / "keys"))
    assert bad.returncode != 0
    assert any(line.split()[:1] == ["2"] and "FAIL" in line for line in bad.stdout.splitlines()), bad.stdout
    assert any(line.split()[:1] == ["1"] and "OK" in line for line in bad.stdout.splitlines()), bad.stdout


def test_update_signed_with_an_unregistered_key_is_rejected_and_the_round_goes_on(tmp_path):
    """Institution 2 signs with a key the server does not know: its update is refused with the reason, the others
    are aggregated, and the ledger still audits."""
    from finlora.simulation.keys import provision_simulation_keys
    from finlora.zk.signing import generate_key, save_private_key

    keys = provision_simulation_keys(tmp_path / "keys", 3)
    save_private_key(generate_key(), keys / "institution-2.key")  # not the key registered for institution-2
    proc = run_cli("simulate", "--clients", "3", "--rounds", "1", "--out", str(tmp_path), "--run-id", "z",
                   "--set", f'zk.keys-dir="{keys}"')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read_jsonl_records(tmp_path / "z" / "metrics.jsonl")[-1]
    assert record["num_clients"] == 2
    (reason,) = record["rejected"].values()
    assert "institution-2" in reason and "bad-signature" in reason
    entry = read_jsonl_records(tmp_path / "z" / "ledger.jsonl")[-1]
    assert sorted(c["node_id"] for c in entry["clients"]) == ["institution-0", "institution-1"]
    audit = run_cli("zk", "audit", str(tmp_path / "z"), "--keys", str(keys))
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.parametrize("overrides, message", [
    (["--strategy", "fedadam", "--zk"], "zk.enabled needs strategy.name fedavg or fedprox"),
    (["--dp-level", "client", "--zk"], "dp.level = client"),
])
def test_incompatible_settings_fail_fast(tmp_path, overrides, message):
    proc = run_cli("simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path), *overrides)
    assert proc.returncode == 2 and message in proc.stderr
