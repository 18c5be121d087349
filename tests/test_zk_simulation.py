"""The commitment layer inside real federated runs: verification before aggregation, ledger, audit."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from finlora.common.adapter import (initial_adapter, is_lora_a, read_adapter_dir, select_keys, shared_lora_a,
                                    to_array_record)
from finlora.common.config import load_config
from finlora.common.io import read_jsonl_records
from finlora.common.model import lora_shapes
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
    # institution 2 refuses round 2 (its privacy budget): a refusal is not a rejection
    assert [len(e["clients"]) for e in ledger[1:]] == [3, 2] and not any(e["rejected"] for e in ledger[1:])
    # every accepted update came with a zero-knowledge range + norm proof, verified by the server, kept in the ledger
    assert ledger[0]["proofs"] and all(c.get("proof") for e in ledger[1:] for c in e["clients"])
    metrics = read_jsonl_records(run_dir / "metrics.jsonl")
    assert [len(m["zk_verify_seconds"]) for m in metrics if m["round"] > 0] == [3, 2]
    assert all(c["zk_proof_bytes"] > 0 and c["zk_prove_seconds"] > 0 for m in metrics if m["round"] > 0
               for c in m["clients"].values())
    assert "zk range/norm proofs: 5 verified" in fedavg_run["proc"].stdout
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


def test_a_bad_proof_and_an_unregistered_key_are_rejected_under_fedprox_with_ffa_lora(tmp_path):
    """Through the real server path: institution 1 (a variant ClientApp) sends its update with one byte of its
    zero-knowledge proof flipped, institution 2 signs with a key the server does not know. Each is refused with
    its reason, institution 0 is aggregated, and the ledger — proofs included — still audits.

    The same run has Flower's FedProx as the strategy and trains FFA-LoRA (settings that do not interact with the
    zk checks, one simulation instead of two): only the B matrices travel, both ways, so a message is half the
    adapter, and the proofs are about B alone; A stays the shared matrix every institution derives from the seed."""
    keys = provision_simulation_keys(tmp_path / "keys", 3)
    save_private_key(generate_key(), keys / "institution-2.key")  # not the key registered for institution-2
    app = make_fault_app(tmp_path / "app")
    (app / "fault_plan.py").write_text('PLAN = {"institution-1": "bad-proof"}\n')
    proc = run_cli("simulate", "--app", str(app), "--clients", "3", "--rounds", "1", "--no-secagg",
                   "--out", str(tmp_path), "--run-id", "z", "--set", f'zk.keys-dir="{keys}"',
                   "--set", "strategy.min-train-nodes=1", "--strategy", "fedprox", "--ffa")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "z"
    record = read_jsonl_records(run_dir / "metrics.jsonl")[-1]
    assert record["num_clients"] == 1 and not record["kept_previous"]
    reasons = sorted(record["rejected"].values())
    assert len(reasons) == 2, reasons
    assert any("institution-1" in r and "bad-proof" in r for r in reasons), reasons
    assert any("institution-2" in r and "bad-signature" in r for r in reasons), reasons
    entry = read_jsonl_records(run_dir / "ledger.jsonl")[-1]
    assert [c["node_id"] for c in entry["clients"]] == ["institution-0"] and entry["clients"][0]["proof"]
    audit = run_cli("zk", "audit", str(run_dir), "--keys", str(keys))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    _check_fedprox_with_ffa_lora(proc.stdout, run_dir)


def _check_fedprox_with_ffa_lora(stdout: str, run_dir: Path) -> None:
    assert "finlora strategy fedprox over" in stdout
    wire = read_jsonl_records(run_dir / "wire.jsonl")
    assert {w["direction"] for w in wire} == {"server->client", "client->server"}
    for w in wire:
        keys = [k for rec in w["arrays"].values() for k in rec]
        assert keys and all(k.endswith(".lora_B.weight") for k in keys)
    cfg = load_config()
    full = to_array_record(initial_adapter(lora_shapes(cfg.model, cfg.lora), seed=0)).count_bytes()
    sent = {w["array_bytes"] for w in wire if w["direction"] == "server->client"}
    assert len(sent) == 1 and 0.45 < sent.pop() / full < 0.55  # the global adapter goes out as B only
    saved = read_adapter_dir(run_dir / "round-1")
    for key, value in saved.items():
        if is_lora_a(key):
            assert np.array_equal(value, shared_lora_a(key, value.shape, cfg.lora.seed))
        else:
            assert np.abs(value).max() > 0  # B was trained
    assert len(select_keys(saved, ffa=True)) == len(saved) // 2


@pytest.mark.parametrize("overrides, message", [
    (["--dp-level", "client", "--zk"], "dp.level = client"),
])
def test_incompatible_settings_fail_fast(tmp_path, overrides, message):
    proc = run_cli("simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path), *overrides)
    assert proc.returncode == 2 and message in proc.stderr
