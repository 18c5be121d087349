"""Secure aggregation through the real simulation (Flower SuperLink, Ray, the ClientApp's ``query.secagg``
stages): one 4-institution run of three rounds with FFA-LoRA (only B is trained, masked and aggregated; A stays the
shared seed's: the TLS deployment test covers secure aggregation of A and B), each round an attack or a failure the
server must survive.

round 1  institution-2 vanishes right after sending its masked update: the round completes, with its update; the
         server sees only masked vectors, and the global adapter is exactly the plaintext FedAvg of all four
round 2  institution-3 masks another vector than the one it committed to and proved: the round is dropped
round 3  two institutions vanish after masking (more than n - t = 1): the round is dropped, the run goes on

No flag turns secure aggregation on: it is the default. (A SIGKILLed SuperNode after masking, under FedAdam, is the
TLS deployment test's.)
"""

from __future__ import annotations

import json
import math
from functools import reduce

import numpy as np
import pytest
from safetensors.numpy import load_file

from finlora.zk.commit import GROUP_ORDER, num_rows
from finlora.zk.encoding import Layout, apply_aggregate
from finlora.zk.secagg import Packing
from tests.conftest import run_cli
from tests.test_update_validation import make_fault_app

INSTITUTIONS = [f"institution-{i}" for i in range(4)]
PLAN = {("institution-2", 1): "drop-after-mask", ("institution-3", 2): "mismatch",
        ("institution-1", 3): "drop-after-mask", ("institution-2", 3): "drop-after-mask"}


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    app = make_fault_app(root / "app")
    spy = root / "spy"
    (app / "fault_plan.py").write_text(f"SECAGG_PLAN = {PLAN!r}\nSPY_DIR = {str(spy)!r}\n")
    proc = run_cli("simulate", "--app", str(app), "--clients", "4", "--rounds", "3", "--out", str(root), "--run-id",
                   "sa", "--ffa", "--set", "eval.every=0",
                   "--set", "train.local-steps=2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "sa"
    sent = {name: [json.loads(line) for line in (spy / f"{name}.jsonl").read_text().splitlines()]
            for name in INSTITUTIONS}
    plain = {(name, r): np.load(spy / f"{name}-{r}.npy") for name in INSTITUTIONS for r in range(1, 4)}
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"proc": proc, "run_dir": run_dir, "sent": sent, "plain": plain, "ledger": ledger, "metrics": metrics}


def _adapter(run_dir, r):
    return load_file(str(run_dir / f"round-{r}" / "adapter_model.safetensors"))


def _weights(run, r, names):
    counts = {}
    for name in names:
        train = next(m for m in run["sent"][name] if m["round"] == r and m["kind"] == "train")
        counts[name] = int(train["config"]["zk"]["num_examples"])
    g = reduce(math.gcd, counts.values())
    return {n: c // g for n, c in counts.items()}


@pytest.mark.parametrize("r,contributors", [(1, INSTITUTIONS)])
def test_the_global_adapter_is_exactly_the_plaintext_fedavg_of_the_committed_updates(secagg_run, r, contributors):
    run = secagg_run
    weights = _weights(run, r, INSTITUTIONS)  # the advertised set fixes the weights
    total = sum(weights[n] * run["plain"][(n, r)] for n in contributors)
    entry = next(e for e in run["ledger"] if e.get("round") == r)
    layout = Layout.from_json(entry["layout"])
    expected = apply_aggregate(_adapter(run["run_dir"], r - 1), total, layout,
                               sum(weights[n] for n in contributors), 12)
    got = _adapter(run["run_dir"], r)
    assert set(got) == set(expected)
    assert layout.size and all(key.endswith(".lora_B.weight") for key, _, _ in layout.slices())  # FFA: B only
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key
    assert {c["node_id"] for c in entry["clients"]} == set(contributors)


def test_no_message_to_the_server_carries_an_update_and_masked_vectors_are_unrelated_to_them(secagg_run):
    run = secagg_run
    for name, messages in run["sent"].items():
        for msg in messages:
            assert all(not rec for rec in msg["arrays"].values()), (name, msg["kind"])  # no tensors at all
            assert "blindings" not in msg["config"].get("zk", {})
            blob = json.dumps(msg["config"])
            plain = run["plain"][(name, msg["round"])]
            for start in (0, 1000, len(plain) - 32):
                window = plain[start:start + 32].astype("<i2").tobytes().hex()
                assert window not in blob, (name, msg["kind"], start)
        masked = [m for m in messages if m["kind"] == "query.mask" and m["round"] == 1]
        assert len(masked) == 1
        vector = bytes.fromhex(masked[0]["config"]["secagg"]["vector"])
        elements = [int.from_bytes(vector[i:i + 32], "little") for i in range(0, len(vector), 32)]
        plain = run["plain"][(name, 1)]
        weights = _weights(run, 1, INSTITUTIONS)
        packing = Packing.for_round(len(plain), num_rows(len(plain)), 16, sum(weights.values()))
        packed = packing.pack(weights[name] * plain, [0] * packing.rows)
        assert len(elements) == packing.elements
        assert not any(int(a) == int(b) for a, b in zip(elements, packed))
        assert all(0 <= e < GROUP_ORDER for e in elements)
        low = np.array([e & 0xFFFF for e in elements[: packing.value_elements]], dtype=np.float64)
        first_slot = plain[:: packing.slots][: len(low)].astype(np.float64)
        assert abs(np.corrcoef(low, first_slot)[0, 1]) < 5 / np.sqrt(len(low))  # chance stays within ~3/sqrt(n)


def test_a_mismatched_masked_vector_and_too_many_dropouts_drop_the_round_and_keep_the_adapter(secagg_run):
    run = secagg_run
    for r, why in ((2, "does not open the weighted commitments"), (3, "round dropped")):
        entry = next(e for e in run["ledger"] if e.get("round") == r)
        assert why in entry["kept_previous"], entry["kept_previous"]
        before, after = _adapter(run["run_dir"], r - 1), _adapter(run["run_dir"], r)
        assert all(np.array_equal(before[k], after[k]) for k in before)
        assert why in run["metrics"][r]["kept_previous"]
    assert "3 rounds completed" in run["proc"].stdout


def test_the_secure_aggregation_run_audits_from_the_commitments_alone(secagg_run):
    run_dir = secagg_run["run_dir"]
    audit = run_cli("zk", "audit", str(run_dir), "--keys", str(run_dir / "keys"))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "audit OK: 4/4" in audit.stdout
    assert secagg_run["ledger"][0]["secagg"] is True
