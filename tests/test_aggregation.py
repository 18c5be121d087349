"""Aggregation arithmetic, checked on Flower's own aggregation function (the one the strategies call)."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from finlora.common.config import load_config
from finlora.server.strategy import STRATEGIES, WEIGHT_KEY, make_strategy, optimizer_state, restore_optimizer_state


def _reply(arrays: dict, examples: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": examples})})


def test_fedavg_equals_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)
    keys = ["l0.q_proj.lora_A.weight", "l0.q_proj.lora_B.weight"]
    clients = [{k: rng.normal(size=(8, 16)).astype(np.float32) for k in keys} for _ in range(3)]
    examples = [10, 30, 60]
    agg = aggregate_arrayrecords([_reply(c, n) for c, n in zip(clients, examples)], "num-examples")
    for k in keys:
        hand = (10 * clients[0][k] + 30 * clients[1][k] + 60 * clients[2][k]) / 100
        np.testing.assert_allclose(agg[k].numpy(), hand, rtol=1e-6, atol=1e-6)


def test_ffa_lora_aggregate_is_exact():
    """With a shared frozen A, mean(B_i) A == mean(B_i A): the global update is exactly the clients' average.

    Without FFA it is not: mean(B_i) mean(A_i) != mean(B_i A_i), which is why FedAvg over LoRA is inexact.
    """
    rng = np.random.default_rng(1)
    a_shared = rng.normal(size=(8, 32)).astype(np.float32)
    bs = [rng.normal(size=(32, 8)).astype(np.float32) for _ in range(3)]
    examples = [5, 15, 20]
    agg_b = aggregate_arrayrecords([_reply({"m.lora_B.weight": b}, n) for b, n in zip(bs, examples)],
                                   "num-examples")["m.lora_B.weight"].numpy()
    exact = sum(n * (b @ a_shared) for b, n in zip(bs, examples)) / sum(examples)
    np.testing.assert_allclose(agg_b @ a_shared, exact, rtol=1e-4, atol=1e-4)

    a_local = [rng.normal(size=(8, 32)).astype(np.float32) for _ in range(3)]
    agg_a = sum(n * a for a, n in zip(a_local, examples)) / sum(examples)
    inexact = sum(n * (b @ a) for b, a, n in zip(bs, a_local, examples)) / sum(examples)
    assert not np.allclose(agg_b @ agg_a, inexact, atol=1e-2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_names_build_flowers_own_with_the_configured_settings(name):
    """What an end-to-end run per strategy would show about the plumbing: the name picks Flower's class, the
    config's settings reach it, and a server optimizer's moments survive a save and restore (resume)."""
    cfg = load_config({"strategy.name": name, "strategy.proximal-mu": 0.25, "strategy.server-lr": 0.02,
                       "strategy.server-tau": 0.003, "zk.enabled": name in ("fedavg", "fedprox")}).strategy
    shapes = {"l0.q_proj.lora_A.weight": (8, 16), "l0.q_proj.lora_B.weight": (16, 8)}
    strategy = make_strategy(cfg, shapes)
    inner = strategy.strategy
    assert type(inner) is STRATEGIES[name] and inner.weighted_by_key == WEIGHT_KEY
    if name == "fedprox":
        assert inner.proximal_mu == 0.25
    if name in ("fedadam", "fedyogi"):
        assert (inner.eta, inner.tau) == (0.02, 0.003)
        moments = {k: np.full(s, i + 1.0, dtype=np.float32) for i, (k, s) in enumerate(shapes.items())}
        inner.m_t, inner.v_t = moments, {k: 2 * v for k, v in moments.items()}
        fresh = make_strategy(cfg, shapes)
        restore_optimizer_state(fresh, optimizer_state(strategy))
        for k in shapes:
            np.testing.assert_array_equal(fresh.strategy.m_t[k], inner.m_t[k])
            np.testing.assert_array_equal(fresh.strategy.v_t[k], inner.v_t[k])
    else:
        assert optimizer_state(strategy) is None


class _ConnectingGrid:
    """The only Grid call a round's sampling makes, ``get_node_ids``, as a SuperLink answers it while institutions
    are still connecting: two at the first call, all four from the second on."""

    def __init__(self) -> None:
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return [11, 12] if self.calls == 1 else [11, 12, 13, 14]


def test_a_round_that_starts_while_institutions_connect_samples_every_one_it_waited_for(monkeypatch):
    """Flower's FedAvg sizes its sample from the nodes connected when the round starts, then waits for
    ``min_available_nodes``: a round started with 2 of 4 connected sampled 2 even at ``fraction-train = 1`` (the
    TLS crash test's round 1 once aggregated 2 of its 3 training banks). The wait now comes first."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from finlora.common.adapter import initial_adapter, to_array_record
    from finlora.server.strategy import NodeWaitDeadline, NotEnoughNodesError

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # the ServerApp process sets these
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = load_config({"zk.enabled": False, "strategy.min-available-nodes": 4, "strategy.min-train-nodes": 2})
    shapes = {"l0.q_proj.lora_A.weight": (8, 16), "l0.q_proj.lora_B.weight": (16, 8)}
    strategy = make_strategy(cfg.strategy, shapes)
    grid = _ConnectingGrid()
    messages = list(strategy.configure_train(1, to_array_record(initial_adapter(shapes, 0)), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    with pytest.raises(NotEnoughNodesError, match=r"only 2 of the 4 institutions needed .*strategy.round-timeout"):
        NodeWaitDeadline(_ConnectingGrid(), 0.0, 4, "round 1").get_node_ids()
