"""Security hardening, findings 4-7: a malicious institution's reply, played against the server's real strategy
(Flower's FedAvg and client-level DP wrapper under finlora's mixin) and its real zk verifier (Ed25519, Pedersen
commitments). Each test sends what the attack sent and checks that it now buys nothing.

* 4: a node claiming another institution's name gets that institution's honest update dropped;
* 5: a small metric example count with a huge signed zk count took the FedAvg weight;
* 6: an extra or missing metric key made Flower raise ``InconsistentMessageReplies`` (the run FAILED);
* 7: client-level DP averaged by a self-reported ``uniform-weight`` (-1.99 moved the adapter by L2 101).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from finlora.client.zk_update import zk_reply_records
from finlora.common.adapter import from_array_record, initial_adapter, to_array_record
from finlora.common.config import load_config
from finlora.common.transport import delta_norm
from finlora.server.strategy import WEIGHT_KEY, make_strategy, with_client_level_dp
from finlora.server.zk_round import ZkVerifier
from finlora.zk import signing

SHAPES = {"base_model.model.layers.0.q_proj.lora_A.weight": (4, 32),
          "base_model.model.layers.0.q_proj.lora_B.weight": (32, 4)}
RUN_ID = "attacks#00112233445566778899aabbccddeeff"


def _reply(node: int, content: RecordDict) -> Message:
    """A training reply from ``node`` as the SuperLink hands it to the ServerApp."""
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=node, dst_node_id=0,
                        reply_to_message_id=uuid.uuid4().hex, group_id="1", created_at=time.time(), ttl=600.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def _update(global_: dict, rng: np.random.Generator, norm: float) -> dict:
    """``global_`` plus a random delta on B of exactly L2 ``norm``."""
    key = next(k for k in global_ if "lora_B" in k)
    delta = rng.normal(size=global_[key].shape)
    out = {k: v.copy() for k, v in global_.items()}
    out[key] = (global_[key] + delta * (norm / np.linalg.norm(delta))).astype(np.float32)
    return out


def _float_reply(node: int, arrays: dict, metrics: dict) -> Message:
    return _reply(node, RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}))


def _strategy(**overrides):
    cfg = load_config({"zk.enabled": False, **overrides})
    strategy = make_strategy(cfg.strategy, SHAPES)
    strategy.current_global = initial_adapter(SHAPES, 0)
    return strategy


# --- finding 6: one client cannot fail the run ---------------------------------------------------------------

def test_extra_missing_or_odd_metrics_reject_that_client_not_the_run():
    strategy = _strategy(**{"strategy.min-train-nodes": 2})
    global_, rng = strategy.current_global, np.random.default_rng(0)
    honest = {"num-examples": 40, "train-loss": 1.5, "train-seconds": 3.0}
    replies = [_float_reply(1, _update(global_, rng, 0.5), honest),
               _float_reply(2, _update(global_, rng, 0.5), {**honest, "bonus-metric": 7.0}),  # extra key: kept aside
               _float_reply(3, _update(global_, rng, 0.5), {"num-examples": 40}),  # no train-loss
               _float_reply(4, _update(global_, rng, 0.5), {**honest, "train-loss": float("nan")}),
               _float_reply(5, _update(global_, rng, 0.5), {**honest, "train-seconds": [1.0, 2.0]})]
    arrays, metrics = strategy.aggregate_train(1, replies)  # Flower used to raise InconsistentMessageReplies
    assert arrays is not None and metrics is not None
    rec = strategy.outcome(1)
    assert sorted(rec.clients) == ["1", "2"] and rec.clients["2"]["bonus_metric"] == 7.0
    assert "metric 'train-loss' must be a finite number, got None" in rec.rejected["3"]
    assert "metric 'train-loss' must be a finite number, got nan" in rec.rejected["4"]
    assert "metric 'train-seconds' must be a finite number" in rec.rejected["5"]
    # what reached Flower: the server's weight (WEIGHT_KEY, which it aggregates by) and the loss, nothing else
    assert set(metrics.keys()) == {"train-loss"} and strategy.weighted_by_key == WEIGHT_KEY


def test_a_malformed_evaluation_reply_is_left_out_of_the_federated_loss():
    strategy = _strategy()
    good = {"num-examples": 10, "eval-loss": 2.0, "eval-tokens": 100}
    replies = [_reply(1, RecordDict({"metrics": MetricRecord(good)})),
               _reply(2, RecordDict({"metrics": MetricRecord({**good, "eval-loss": 4.0, "extra": 1})})),
               _reply(3, RecordDict({"metrics": MetricRecord({"num-examples": 10})})),
               _reply(4, RecordDict({"metrics": MetricRecord({**good, "eval-loss": float("inf")})}))]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval-loss"] == pytest.approx(3.0)
    rec = strategy.outcome(1)
    assert sorted(rec.client_eval) == ["1", "2"] and sorted(rec.eval_rejected) == ["3", "4"]


# --- finding 7: client-level DP weights are the server's ------------------------------------------------------

def test_client_level_dp_ignores_a_self_reported_weight_and_bounds_each_update_by_the_clip():
    clip = 1.0
    cfg = load_config({"zk.enabled": False, "dp.level": "client", "dp.max-grad-norm": clip,
                       "strategy.min-train-nodes": 2})
    strategy = make_strategy(cfg.strategy, SHAPES, client_level_clip=clip)
    runner = with_client_level_dp(strategy, noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=3)
    global_ = initial_adapter(SHAPES, 0)
    strategy.current_global = global_
    rng = np.random.default_rng(1)
    honest = {"num-examples": 50, "train-loss": 1.0}
    replies = [_float_reply(1, _update(global_, rng, 0.9), {**honest, "uniform-weight": 1}),
               _float_reply(2, _update(global_, rng, 0.9), {**honest, "uniform-weight": -1.99}),  # the attack
               _float_reply(3, _update(global_, rng, 0.9), {**honest, "num-examples": 10**6})]
    arrays, _ = runner.aggregate_train(1, replies)
    moved = delta_norm({k: v - global_[k] for k, v in from_array_record(arrays).items()})
    assert moved <= clip * (1 + 1e-6), moved  # the attack moved it by 101 with per-update bound 8
    assert set(strategy.outcome(1).clients) == {"1", "2", "3"}
    # an update above the clipping norm is rejected, whatever strategy.max-update-norm says
    big = _float_reply(4, _update(global_, rng, 5.0), honest)
    strategy.aggregate_train(2, [big, *replies[:2]])
    assert "exceeds strategy.max-update-norm = 1" in strategy.outcome(2).rejected["4"]


def test_equal_weighting_gives_every_institution_the_same_say():
    strategy = _strategy(**{"strategy.weighting": "equal", "strategy.min-train-nodes": 2})
    global_, rng = strategy.current_global, np.random.default_rng(2)
    a, b = _update(global_, rng, 0.5), _update(global_, rng, 0.5)
    arrays, _ = strategy.aggregate_train(1, [_float_reply(1, a, {"num-examples": 1, "train-loss": 1.0}),
                                             _float_reply(2, b, {"num-examples": 10**6, "train-loss": 1.0})])
    mean = {k: (a[k] + b[k]) / 2 for k in a}
    got = from_array_record(arrays)
    assert all(np.allclose(got[k], mean[k], atol=1e-6) for k in mean)


# --- findings 4 and 5: zk replies ----------------------------------------------------------------------------

@pytest.fixture
def zk_setup(tmp_path: Path) -> dict:
    keys_dir = tmp_path / "keys"
    keys = {}
    for name in ("bank-a", "bank-b", "mallory"):
        keys[name] = signing.generate_key()
        signing.save_private_key(keys[name], keys_dir / f"{name}.key")
        signing.save_public_key(keys[name], keys_dir / f"{name}{signing.PUBLIC_SUFFIX}")
    (tmp_path / "run").mkdir()
    return {"keys_dir": keys_dir, "run": tmp_path / "run", "tmp": tmp_path}


def _verifier(setup: dict, registry: dict | None = None, equal: bool = False) -> ZkVerifier:
    overrides = {}
    if registry is not None:
        path = setup["tmp"] / "institutions.json"
        path.write_text(json.dumps({name: {"node_id": node, "key_sha256": "-"} for name, node in registry.items()}))
        overrides["zk.registry"] = str(path)
    cfg = load_config({"zk.secagg": False, **overrides})  # committed updates in the clear: what these attacks read
    return ZkVerifier.open(cfg.zk, RUN_ID, setup["run"], setup["keys_dir"], equal_weights=equal)


def _zk_content(setup: dict, claimed: str, key_of: str, server_round: int, global_: dict, rng, examples: int = 40,
                metric_examples: int | None = None) -> RecordDict:
    """A zk reply claiming to be ``claimed``, signed with ``key_of``'s key (the sender holds only its own)."""
    cfg = load_config({"zk.secagg": False})
    local = _update(global_, rng, 0.5)
    arrays, zk_record, _ = zk_reply_records(local, global_, cfg.zk, setup["keys_dir"] / f"{key_of}.key", RUN_ID,
                                              server_round, key_of, examples, seed=int(rng.integers(1 << 30)))
    zk_record["institution"] = claimed
    metrics = MetricRecord({"num-examples": examples if metric_examples is None else metric_examples,
                            "train-loss": 1.0})
    return RecordDict({"arrays": arrays, "metrics": metrics, "zk": zk_record})


def test_an_impostor_is_rejected_alone_and_its_victim_is_aggregated(zk_setup):
    """Both ways the server ties names to nodes, the registry (institution -> SuperNode) and the binding on first
    signature, each with its own verifier and ledger, judge the same replies (their proofs made once)."""
    verifiers = {}
    for how, registry in (("registry", {"bank-a": 11, "bank-b": 12, "mallory": 13}), ("first-signature", None)):
        setup = {**zk_setup, "run": zk_setup["tmp"] / f"run-{how}"}
        setup["run"].mkdir()
        verifiers[how] = _verifier(setup, registry)
    global_, rng = initial_adapter(SHAPES, 0), np.random.default_rng(3)
    round1 = [("11", _zk_content(zk_setup, "bank-a", "bank-a", 1, global_, rng)),
              ("12", _zk_content(zk_setup, "bank-b", "bank-b", 1, global_, rng)),
              ("13", _zk_content(zk_setup, "bank-a", "mallory", 1, global_, rng))]  # mallory says it is bank-a
    new_globals = []
    for how, verifier in verifiers.items():
        new_global, result = verifier.verify_and_aggregate(1, round1, global_)
        assert new_global is not None, how
        assert sorted(s.node_id for s in result.accepted) == ["bank-a", "bank-b"], how
        assert list(result.rejected) == ["13"] and result.rejected["13"].startswith("impersonation"), result.rejected
        new_globals.append(new_global)
    assert all(np.array_equal(new_globals[0][k], new_globals[1][k]) for k in new_globals[0])
    # round 2: bank-a's node now claims bank-b, and mallory claims bank-b: both rejected, bank-b goes on
    round2 = [("11", _zk_content(zk_setup, "bank-b", "bank-a", 2, new_globals[0], rng)),
              ("12", _zk_content(zk_setup, "bank-b", "bank-b", 2, new_globals[0], rng)),
              ("13", _zk_content(zk_setup, "bank-b", "mallory", 2, new_globals[0], rng))]
    for how, verifier in verifiers.items():
        _, result = verifier.verify_and_aggregate(2, round2, new_globals[0])
        assert [s.node_id for s in result.accepted] == ["bank-b"], how
        assert sorted(result.rejected) == ["11", "13"], how
        assert all(r.startswith("impersonation") for r in result.rejected.values()), result.rejected


def test_a_node_outside_the_registry_cannot_speak_for_anyone(zk_setup):
    verifier = _verifier(zk_setup, {"bank-a": 11})
    global_, rng = initial_adapter(SHAPES, 0), np.random.default_rng(4)
    _, result = verifier.verify_and_aggregate(1, [("14", _zk_content(zk_setup, "bank-b", "bank-b", 1, global_, rng))],
                                              global_)
    assert not result.accepted and "impersonation" in result.rejected["14"]


def _zk_strategy(zk_setup, **overrides):
    cfg = load_config({"strategy.min-train-nodes": 1, "zk.secagg": False, **overrides})
    verifier = _verifier(zk_setup, equal=cfg.strategy.weighting == "equal")
    strategy = make_strategy(cfg.strategy, SHAPES, zk=verifier)
    strategy.current_global = initial_adapter(SHAPES, 0)
    return strategy


def test_the_signed_count_and_the_metric_count_are_one_weight_under_one_cap(zk_setup):
    strategy = _zk_strategy(zk_setup)
    global_, rng = strategy.current_global, np.random.default_rng(5)
    replies = [_reply(11, _zk_content(zk_setup, "bank-a", "bank-a", 1, global_, rng, examples=100)),
               # the attack: metric 100, signed count 2^31 (mallory signs what it likes with its own key)
               _reply(13, _zk_content(zk_setup, "mallory", "mallory", 1, global_, rng, examples=2**31,
                                      metric_examples=100)),
               # both counts huge and equal: above strategy.max-examples
               _reply(12, _zk_content(zk_setup, "bank-b", "bank-b", 1, global_, rng, examples=2**31))]
    arrays, _ = strategy.aggregate_train(1, replies)
    rec = strategy.outcome(1)
    assert "differs from the signed zk count 2147483648" in rec.rejected["13"]
    assert "from 1 to 10000000 (strategy.max-examples)" in rec.rejected["12"]
    assert [s.node_id for s in rec.zk.accepted] == ["bank-a"] and rec.zk.total_weight == 100


def test_zk_equal_weighting_counts_each_institution_once(zk_setup):
    strategy = _zk_strategy(zk_setup, **{"strategy.weighting": "equal"})
    global_, rng = strategy.current_global, np.random.default_rng(6)
    replies = [_reply(11, _zk_content(zk_setup, "bank-a", "bank-a", 1, global_, rng, examples=10)),
               _reply(12, _zk_content(zk_setup, "bank-b", "bank-b", 1, global_, rng, examples=9_000_000))]
    strategy.aggregate_train(1, replies)
    assert strategy.outcome(1).zk.total_weight == 2


def test_a_signature_from_another_deployment_does_not_verify(zk_setup):
    """Finding 8: run ids were the same across deployments (default run name 'federation'); the signed run id now
    carries each deployment's random nonce, so an update replayed from another deployment is rejected."""
    other = ZkVerifier.open(load_config({"zk.secagg": False}).zk, "attacks#ffeeddccbbaa99887766554433221100",
                            zk_setup["run"], zk_setup["keys_dir"])
    global_, rng = initial_adapter(SHAPES, 0), np.random.default_rng(7)
    signed_here = _zk_content(zk_setup, "bank-a", "bank-a", 1, global_, rng)  # under RUN_ID's nonce
    _, result = other.verify_and_aggregate(1, [("11", signed_here)], global_)
    assert not result.accepted and "bad-signature" in result.rejected["11"]
    _, result = _verifier(zk_setup).verify_and_aggregate(1, [("11", signed_here)], global_)
    assert [s.node_id for s in result.accepted] == ["bank-a"]
