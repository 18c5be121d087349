"""The commitment layer inside real federated runs: verification before aggregation, ledger, audit."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from finlora.common.io import read_jsonl_records
from finlora.simulation.keys import provision_simulation_keys
from finlora.zk.signing import generate_key, save_private_key
from tests.conftest import run_cli
from tests.test_update_validation import make_fault_app


def test_zk_run_is_auditable_and_tampering_is_caught(fedavg_run, tmp_path):
    """fedavg_run has zk on (the default): its ledger audits OK; a changed global adapter value fails."""
    assert fedavg_run["proc"].returncode == 0
    run_dir = fedavg_run["run_dir"]
    ledger = read_jsonl_records(run_dir / "ledger.jsonl")
    assert ledger[0]["type"] == "header" and [e["round"] for e in ledger[1:]] == [1, 2]
    assert all(len(e["clients"]) == 3 and not e["rejected"] for e in ledger[1:])
    # every accepted update came with a zero-knowledge range + norm proof, verified by the server, kept in the ledger
    assert ledger[0]["proofs"] and all(c.get("proof") for e in ledger[1:] for c in e["clients"])
    metrics = read_jsonl_records(run_dir / "metrics.jsonl")
    assert all(len(m["zk_verify_seconds"]) == 3 for m in metrics if m["round"] > 0)
    assert all(c["zk_proof_bytes"] > 0 and c["zk_prove_seconds"] > 0 for m in metrics if m["round"] > 0
               for c in m["clients"].values())
    assert "zk range/norm proofs: 6 verified" in fedavg_run["proc"].stdout
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

    # a proof in the ledger changed by one byte: the audit names the round and the node's proof
    forged = tmp_path / "forged-proof"
    shutil.copytree(run_dir, forged)
    lines = (forged / "ledger.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    proof = bytearray(base64.b64decode(entry["clients"][0]["proof"]))
    proof[100] ^= 0x04
    entry["clients"][0]["proof"] = base64.b64encode(bytes(proof)).decode()
    lines[1] = json.dumps(entry)
    (forged / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    bad = run_cli("zk", "audit", str(forged), "--keys", str(run_dir / "keys"))
    assert bad.returncode != 0
    assert any(line.split()[:1] == ["1"] and "range/norm proof fails" in line for line in bad.stdout.splitlines()), \
        bad.stdout


def test_a_bad_proof_and_an_unregistered_key_are_rejected_and_the_round_goes_on(tmp_path):
    """Through the real server path: institution 1 (a variant ClientApp) sends its update with one byte of its
    zero-knowledge proof flipped, institution 2 signs with a key the server does not know. Each is refused with
    its reason, institution 0 is aggregated, and the ledger — proofs included — still audits."""
    keys = provision_simulation_keys(tmp_path / "keys", 3)
    save_private_key(generate_key(), keys / "institution-2.key")  # not the key registered for institution-2
    app = make_fault_app(tmp_path / "app")
    (app / "fault_plan.py").write_text('PLAN = {"institution-1": "bad-proof"}\n')
    proc = run_cli("simulate", "--app", str(app), "--clients", "3", "--rounds", "1", "--out", str(tmp_path),
                   "--run-id", "z", "--set", f'zk.keys-dir="{keys}"', "--set", "strategy.min-train-nodes=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read_jsonl_records(tmp_path / "z" / "metrics.jsonl")[-1]
    assert record["num_clients"] == 1 and not record["kept_previous"]
    reasons = sorted(record["rejected"].values())
    assert len(reasons) == 2, reasons
    assert any("institution-1" in r and "bad-proof" in r for r in reasons), reasons
    assert any("institution-2" in r and "bad-signature" in r for r in reasons), reasons
    entry = read_jsonl_records(tmp_path / "z" / "ledger.jsonl")[-1]
    assert [c["node_id"] for c in entry["clients"]] == ["institution-0"] and entry["clients"][0]["proof"]
    audit = run_cli("zk", "audit", str(tmp_path / "z"), "--keys", str(keys))
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.parametrize("overrides, message", [
    (["--strategy", "fedadam", "--zk"], "zk.enabled needs strategy.name fedavg or fedprox"),
    (["--dp-level", "client", "--zk"], "dp.level = client"),
])
def test_incompatible_settings_fail_fast(tmp_path, overrides, message):
    proc = run_cli("simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path), *overrides)
    assert proc.returncode == 2 and message in proc.stderr
