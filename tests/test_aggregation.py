"""Aggregation arithmetic, checked on Flower's own aggregation function (the one the strategies call)."""

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords


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
