"""End to end through the real CLI, a real SuperLink, Flower's simulation engine and Ray (no mocks)."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from opacus.accountants import RDPAccountant

from finlora.client.train import round_learning_rate
from finlora.common.adapter import arrays_digest, read_adapter_dir
from finlora.common.config import load_config
from finlora.common.io import read_jsonl_records
from finlora.common.model import lora_shapes
from finlora.eval.tasks import TASKS
from tests.conftest import flower_processes, run_cli

LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.lora_[AB]\.weight$")


def _metrics(run_dir):
    return {r["round"]: r for r in read_jsonl_records(run_dir / "metrics.jsonl")}


def _ok(run: dict) -> None:
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_three_institutions_two_rounds_lower_heldout_loss(fedavg_run):
    _ok(fedavg_run)
    metrics = _metrics(fedavg_run["run_dir"])
    assert sorted(metrics) == [0, 1, 2]
    assert metrics[2]["heldout_loss"] < metrics[0]["heldout_loss"]
    assert metrics[0]["train_loss"] is None and metrics[1]["train_loss"] is not None
    for k, partitions in ((1, {0, 1, 2}), (2, {0, 1})):  # institution 2's budget lasts one round
        assert metrics[k]["num_clients"] == len(partitions) and metrics[k]["bytes_sent_per_client"] > 0
        assert {c["partition_id"] for c in metrics[k]["clients"].values()} == partitions
        assert (fedavg_run["run_dir"] / f"round-{k}" / "adapter_config.json").is_file()
    assert "held-out loss" in fedavg_run["proc"].stdout  # the final summary table
    assert "base model really loaded as: unquantized float" in fedavg_run["proc"].stdout  # auto on a CPU
    assert (fedavg_run["run_dir"] / "loss.png").stat().st_size > 1000
    assert not fedavg_run["leftover"], "SuperLink/Ray processes were left behind"


def test_only_lora_a_b_cross_the_wire(fedavg_run):
    _ok(fedavg_run)
    wire = read_jsonl_records(fedavg_run["run_dir"] / "wire.jsonl")
    expected = set(load_config().lora.target_module_list)
    directions = {(w["round"], w["direction"], w["message_type"]) for w in wire}
    expected_directions = {(1, "client->server", "train"), (2, "server->client", "train"),
                           (2, "server->client", "evaluate")}
    assert expected_directions <= directions
    for w in wire:
        assert set(w["records"]) <= {"arrays", "config", "metrics", "zk"}
        if w["direction"] == "client->server":  # the quantized update, its metrics, its commitments + signature
            assert set(w["records"]) == {"arrays", "metrics", "zk"}
        keys = [k for rec in w["arrays"].values() for k in rec]
        assert keys and all(LORA_KEY.match(k) for k in keys), keys
        assert {k.split(".")[-3].replace("_proj", "") + "_proj" for k in keys} == expected
        assert len(keys) == 2 * 3 * 2  # 2 layers x q/k/v x (A, B)
        n_values = sum(int(np.prod(s)) for rec in w["arrays"].values() for s in rec.values())
        assert w["array_bytes"] < 4 * n_values + 4096  # float32 (or int16 quantized) LoRA tensors, nothing else


def test_saved_adapter_is_the_global_adapter_and_loads_with_peft(fedavg_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _ok(fedavg_run)
    run_dir = fedavg_run["run_dir"]
    wire = read_jsonl_records(run_dir / "wire.jsonl")
    for k in (1, 2):
        saved = read_adapter_dir(run_dir / f"round-{k}")
        sent = {w["sha256"]["arrays"] for w in wire
                if w["round"] == k and w["direction"] == "server->client" and w["message_type"] == "evaluate"}
        assert sent == {arrays_digest(saved)}  # what the server held in memory is what it saved
    base_path = json.loads((run_dir / "round-2" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir / "round-2").eval()
    from finlora.common.adapter import load_lora_state
    from finlora.common.model import get_model_bundle

    cfg = load_config()
    in_memory = get_model_bundle(cfg.model, cfg.lora).model
    load_lora_state(in_memory, read_adapter_dir(run_dir / "round-2"))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
    in_memory.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5)


def test_server_evaluates_the_global_adapter_every_round(fedavg_run):
    _ok(fedavg_run)
    metrics = _metrics(fedavg_run["run_dir"])
    assert "eval" not in metrics[0]
    for k in (1, 2):
        results = metrics[k]["eval"][f"round-{k}"]
        assert set(results) == {"fpb", "tfns"}
        for r in results.values():
            assert r["status"] == "ok" and r["n"] == 32 and 0 <= r["accuracy"] <= 1
        saved = json.loads((fedavg_run["run_dir"] / "eval" / f"round-{k}" / "results.json").read_text())
        assert saved["fpb"]["accuracy"] == results["fpb"]["accuracy"]
    assert "benchmark evaluation of the global adapter after round 2" in fedavg_run["proc"].stdout


def test_dp_simulation_accounts_refuses_and_still_learns(fedavg_run):
    """Sample-level DP in the defaults' run: each round's epsilon is what Opacus's accountant gives for the recorded
    steps, noise and sampling rate, never above the budget; institution 2 (its own budget of 7) trains round 1 and
    then refuses, and the others carry round 2."""
    _ok(fedavg_run)
    proc = fedavg_run["proc"]
    records = _metrics(fedavg_run["run_dir"])
    assert records[2]["heldout_loss"] < records[0]["heldout_loss"]
    by_partition: dict[int, list[tuple[int, dict]]] = {}
    for k in (1, 2):
        for p in records[k]["privacy"].values():
            assert {"epsilon", "delta", "sigma", "sample_rate", "steps"} <= set(p)
            by_partition.setdefault(p["partition_id"], []).append((k, p))
    for pid in (0, 1):
        eps = [p["epsilon"] for _, p in by_partition[pid]]
        assert len(eps) == 2 and eps[0] < eps[1] <= 8.0
        for _, p in by_partition[pid]:
            acc = RDPAccountant()
            for _ in range(p["steps"]):
                acc.step(noise_multiplier=p["sigma"], sample_rate=p["sample_rate"])
            assert abs(acc.get_epsilon(delta=p["delta"]) - p["epsilon"]) < 1e-6
    assert [k for k, _ in by_partition[2]] == [1]
    assert len(records[2]["refused"]) == 1
    assert "PrivacyBudgetExhausted" in next(iter(records[2]["errors"].values()))
    assert "epsilon spent" in proc.stdout and (fedavg_run["run_dir"] / "privacy.png").stat().st_size > 1000


def test_fedadam_over_int8_updates_runs_and_resumes_with_its_moments(tmp_path, eval_data_dir):
    """A server optimizer end to end (FedYogi differs only in Flower's class: test_strategy_names_build_flowers_own),
    in one run with int8 updates crossing Flower (two settings that meet only at the aggregate), then resumed: zk
    off, since a server optimizer breaks the zk ledger's equation (the zk ledger across a restart is the TLS
    deployment's crash test); DP off, so that one round's learning is plain to see."""
    run_dir = tmp_path / "fedadam"
    proc = run_cli("simulate", "--clients", "2", "--rounds", "1", "--strategy", "fedadam", "--out", str(tmp_path),
                   "--run-id", "fedadam", "--no-zk", "--set", 'transport.dtype="int8"', "--set", "dp.enabled=false",
                   "--set", "eval.every=0", "--set", f'eval.data-dir="{eval_data_dir}"')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = _metrics(run_dir)
    assert metrics[1]["num_clients"] == 2 and not metrics[1]["rejected"]
    assert metrics[1]["heldout_loss"] < metrics[0]["heldout_loss"] - 0.3
    # int8: a byte a value, plus names and scales
    cfg = load_config()
    shapes = lora_shapes(cfg.model, cfg.lora)
    values = sum(int(np.prod(s)) for s in shapes.values())
    assert values <= metrics[1]["bytes_sent_per_client"] <= values + 400 * len(shapes) < 4 * values
    assert all(c["update_norm"] <= cfg.strategy.max_update_norm for c in metrics[1]["clients"].values())
    _check_resume_continues_from_saved_round(run_dir)
    _check_adam_moments_survive_resume(run_dir)


def _check_resume_continues_from_saved_round(run_dir):
    """Resumed to 2 rounds: only round 2 is computed, from the saved round 1, with round 2's learning rate, and
    --final-eval scores every task of the benchmark on every row of the run's own eval.data-dir (saved when it
    started: the default data directory given to a new run must not replace it)."""
    round1_file = run_dir / "round-1" / "adapter_model.safetensors"
    round1_bytes, round1_mtime = round1_file.read_bytes(), round1_file.stat().st_mtime_ns
    before = _metrics(run_dir)
    again = run_cli("simulate", "--clients", "2", "--rounds", "2", "--resume", str(run_dir), "--final-eval")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    after = _metrics(run_dir)
    assert sorted(after) == [0, 1, 2]
    assert all(after[k] == before[k] for k in (0, 1))  # nothing recomputed
    assert round1_file.read_bytes() == round1_bytes and round1_file.stat().st_mtime_ns == round1_mtime
    wire = read_jsonl_records(run_dir / "wire.jsonl")
    sent_round2 = {w["sha256"]["arrays"] for w in wire
                   if w["round"] == 2 and w["direction"] == "server->client" and w["message_type"] == "train"}
    assert sent_round2 == {arrays_digest(read_adapter_dir(run_dir / "round-1"))}
    expected_lr = round_learning_rate(load_config().train, 2, 2)
    assert after[2]["clients"] and all(abs(c["lr"] - expected_lr) < 1e-12 for c in after[2]["clients"].values())
    final = json.loads((run_dir / "eval" / "final" / "results.json").read_text())
    assert set(final) == set(TASKS) and final["fpb"]["n"] == 60 and final["fiqa"]["status"] == "no data"
    assert after[2]["eval"]["final"]["tfns"]["n"] == 60


def _check_adam_moments_survive_resume(run_dir):
    """After the resume, round 2's moments must continue round 1's, m2 = b1 m1 + (1-b1) d and
    v2 = b2 v1 + (1-b2) d^2 for the same delta d; moments restarted from zero would satisfy the equations with
    m1 = v1 = 0 instead."""
    from flwr.serverapp.strategy import FedAdam
    from safetensors.numpy import load_file

    first, second = (load_file(str(run_dir / f"round-{k}" / "server_optimizer.safetensors")) for k in (1, 2))
    adam = FedAdam()
    b1, b2 = adam.beta_1, adam.beta_2
    for key in (k for k in first if k.startswith("m.")):
        m1, v1 = first[key].astype(np.float64), first["v" + key[1:]].astype(np.float64)
        m2, v2 = second[key].astype(np.float64), second["v" + key[1:]].astype(np.float64)
        delta = (m2 - b1 * m1) / (1 - b1)
        np.testing.assert_allclose(v2, b2 * v1 + (1 - b2) * delta**2, rtol=1e-3, atol=1e-12)
        restarted = m2 / (1 - b1)
        assert not np.allclose(v2, (1 - b2) * restarted**2, rtol=1e-3, atol=1e-12)


def test_failed_run_exits_nonzero_and_leaves_nothing_behind(tmp_path):
    before = flower_processes()
    # a model directory that passes the checks made before Flower starts (it has a config.json) but cannot load
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc = run_cli("simulate", "--clients", "2", "--rounds", "1", "--model", str(broken),
                   "--out", str(tmp_path), "--run-id", "bad")
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr
    assert not flower_processes() - before
