"""FedAdam / FedYogi with zk: the server steps along the verified committed average with Flower's own strategy,
and the audit recomputes that step from the ledger (``zk/server_opt.py``). The replica is pinned to Flower's
classes bit for bit; a server that skipped the step, or stepped with other hyperparameters than it published,
fails the audit at that round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedYogi
from safetensors.numpy import save_file

from finlora.client.zk_update import zk_reply_records
from finlora.common.adapter import from_array_record, initial_adapter
from finlora.common.config import load_config
from finlora.server.strategy import make_strategy, server_optimizer_of
from finlora.server.zk_round import ZkLedger, ZkVerifier
from finlora.zk import signing
from finlora.zk.audit import audit_run
from finlora.zk.encoding import apply_aggregate
from finlora.zk.ledger import adapter_relpath, file_sha256, read_ledger
from finlora.zk.server_opt import Moments, ServerOptimizer
from tests.test_reply_attacks import _reply

SHAPES = {"base_model.model.layers.0.q_proj.lora_A.weight": (4, 32),
          "base_model.model.layers.0.q_proj.lora_B.weight": (32, 4),
          "base_model.model.layers.0.v_proj.lora_B.weight": (16, 4)}
RUN_ID = "server-opt#00112233445566778899aabbccddeeff"
BANKS = ("bank-a", "bank-b")


@pytest.mark.parametrize("flower_class, name", [(FedAdam, "fedadam"), (FedYogi, "fedyogi")])
def test_the_audits_replica_of_the_server_step_is_flowers_bit_for_bit(flower_class, name):
    flower = flower_class(weighted_by_key="w", eta=0.03, tau=0.001)
    replica = ServerOptimizer(name, 0.03, flower.beta_1, flower.beta_2, 0.001)
    rng = np.random.default_rng(0)
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    mine, moments = dict(current), Moments.zero()
    for server_round in (1, 2, 3):
        averaged = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in mine.items()}
        flower.current_arrays = dict(mine)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in averaged.items()}),
                              "metrics": MetricRecord({"w": 1.0})})
        stepped, _ = flower.aggregate_train(server_round, [_reply(1, content)])
        theirs = {k: np.asarray(v, dtype=np.float32) for k, v in from_array_record(stepped).items()}
        mine, moments = replica.step(server_round, mine, averaged, moments)
        assert all(mine[k].dtype == np.float32 and mine[k].tobytes() == theirs[k].tobytes() for k in SHAPES)
        assert all(moments.m[k].tobytes() == flower.m_t[k].tobytes() and
                   moments.v[k].tobytes() == flower.v_t[k].tobytes() for k in SHAPES)
        assert not np.array_equal(mine[next(iter(SHAPES))], averaged[next(iter(SHAPES))])  # a real step, not FedAvg


def _save_adapter(run_dir: Path, round_num: int, tensors: dict) -> None:
    path = run_dir / adapter_relpath(round_num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def stepped_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two banks, two zk rounds (proofs on; committed updates in the clear, the masked path is the secagg
    simulation's) through the server's real strategy with Flower's FedYogi, its real verifier and ledger: the run
    directory as ``finlora zk audit`` reads it."""
    tmp_path = tmp_path_factory.mktemp("stepped")
    keys_dir, run_dir = tmp_path / "keys", tmp_path / "run"
    for name in BANKS:
        key = signing.generate_key()
        signing.save_private_key(key, keys_dir / f"{name}.key")
        signing.save_public_key(key, keys_dir / f"{name}{signing.PUBLIC_SUFFIX}")
    run_dir.mkdir()
    cfg = load_config({"strategy.name": "fedyogi", "strategy.server-lr": 0.05, "zk.secagg": False,
                       "strategy.min-train-nodes": 2})
    verifier = ZkVerifier.open(cfg.zk, RUN_ID, run_dir, keys_dir)
    strategy = make_strategy(cfg.strategy, SHAPES, zk=verifier)
    optimizer = server_optimizer_of(strategy)
    assert optimizer == ServerOptimizer("fedyogi", 0.05, 0.9, 0.99, cfg.strategy.server_tau)
    ledger = ZkLedger(cfg.zk, RUN_ID, run_dir, verifier.public_keys, server_optimizer=optimizer)
    global_, rng = initial_adapter(SHAPES, 0), np.random.default_rng(4)
    _save_adapter(run_dir, 0, global_)
    ledger.write_header()
    averages = {}
    for server_round in (1, 2):
        strategy.current_global = strategy.strategy.current_arrays = dict(global_)  # what configure_train sets
        replies = []
        for node, name in enumerate(BANKS, start=1):
            local = {k: (v + rng.normal(scale=0.02, size=v.shape)).astype(np.float32) for k, v in global_.items()}
            arrays, record, _ = zk_reply_records(local, global_, cfg.zk, keys_dir / f"{name}.key", RUN_ID,
                                                 server_round, name, 40 + node, seed=server_round * 10 + node)
            metrics = MetricRecord({"num-examples": 40 + node, "train-loss": 1.0})
            replies.append(_reply(node, RecordDict({"arrays": arrays, "metrics": metrics, "zk": record})))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        outcome = strategy.outcome(server_round)
        assert arrays is not None and not outcome.rejected, outcome.rejected
        averages[server_round] = verifier_average(outcome.zk, global_, cfg)
        global_ = from_array_record(arrays)
        _save_adapter(run_dir, server_round, global_)
        ledger.record(server_round, outcome.zk)
    return {"run": run_dir, "keys": keys_dir, "averages": averages}


def verifier_average(result, previous: dict, cfg) -> dict:
    """previous + the committed weighted average: what FedAvg would have published."""
    return apply_aggregate(previous, result.aggregate, result.layout, result.total_weight, cfg.zk.frac_bits)


def _publics(keys_dir: Path) -> dict:
    return {p.name.removesuffix(signing.PUBLIC_SUFFIX): signing.load_public_key(p)
            for p in keys_dir.glob(f"*{signing.PUBLIC_SUFFIX}")}


def test_a_fedyogi_run_under_zk_audits_and_its_header_names_the_step(stepped_run):
    header = read_ledger(stepped_run["run"])[0]
    assert header["server_optimizer"]["name"] == "fedyogi" and header["server_optimizer"]["eta"] == 0.05
    verdicts = audit_run(stepped_run["run"], _publics(stepped_run["keys"]))
    assert [(v.round, v.ok) for v in verdicts] == [(0, True), (1, True), (2, True)], verdicts


def test_a_server_that_publishes_the_plain_average_or_states_other_hyperparameters_fails_the_audit(stepped_run,
                                                                                                   tmp_path):
    run, publics = tmp_path / "run", _publics(stepped_run["keys"])
    shutil.copytree(stepped_run["run"], run)  # the honest run stays as it was for the other test
    # round 2's adapter replaced by the committed average itself (FedAvg), its ledger hash updated to match
    _save_adapter(run, 2, stepped_run["averages"][2])
    lines = (run / "ledger.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    entry["adapter_sha256"] = file_sha256(run / entry["adapter_file"])
    (run / "ledger.jsonl").write_text("\n".join([*lines[:2], json.dumps(entry)]) + "\n")
    verdicts = audit_run(run, publics)
    assert [v.ok for v in verdicts] == [True, True, False]
    assert "previous + fedyogi step along aggregate" in "; ".join(verdicts[2].problems)
    # a header that states another server learning rate than the one the server stepped with
    header = json.loads(lines[0])
    header["server_optimizer"]["eta"] = 0.01
    (run / "ledger.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert [v.ok for v in audit_run(run, publics)] == [True, False, False]
