"""One federated round of a mixture's router (``moe.experts`` set): the institution loads the global router into
its mixture (its base model with the frozen experts), trains the router on its own data and replies with the router
only: 878 bytes on the tiny model with two experts, where its LoRA update is 31 kB.

The task runs wherever :data:`client.tasks.TASKS` runs ("train"): in a simulation's Ray actor or in the
institution's resident trainer, which keeps the mixture loaded between rounds in :data:`MIXTURE_CACHE`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from finlora.client.dp_setup import PrivacyPolicyViolation
from finlora.client.local_data import local_data
from finlora.client.moe_train import train_router_on
from finlora.client.node_settings import NodeSettings
from finlora.common.config import FinloraConfig, parse_experts
from finlora.common.model import load_base_model
from finlora.common.moe import build_mixture, load_router_state, router_state

MIXTURE_CACHE: dict[tuple[Any, ...], tuple[Any, Any]] = {}
"""Explicit per-process cache: (model, quantization, experts, depth) -> (mixture, tokenizer). Building one loads the
base model and every expert; a resident trainer then does it once per run, not once per round."""


def cached_mixture(cfg: FinloraConfig) -> tuple[Any, Any]:
    """The mixture of ``moe.experts`` on the configured base model, built once per process."""
    experts = parse_experts(cfg.moe.experts, "moe.experts")
    key = (cfg.model.name, cfg.model.quantization, tuple(sorted(experts.items())), cfg.moe.depth)
    if key not in MIXTURE_CACHE:
        model, tokenizer, _ = load_base_model(cfg.model)
        MIXTURE_CACHE[key] = (build_mixture(model, experts, depth=cfg.moe.depth), tokenizer)
    return MIXTURE_CACHE[key]


def enforce_router_policy(node: NodeSettings) -> None:
    """Refuse (raise :class:`PrivacyPolicyViolation`) router training at a deployed institution whose node config
    requires DP-SGD or secure aggregation: the router is trained without DP and averaged in plain FedAvg, whatever
    the run config says, so a server must not be able to reach the institution's data through a mixture run.
    Simulated institutions follow the run config (one user plays every party)."""
    if not node.deployed or not (node.dp_required or node.secagg_required):
        return
    required = " and ".join(name for name, on in (("DP-SGD (node config dp-required)", node.dp_required),
                                                  ("secure aggregation (node config secagg-required)",
                                                   node.secagg_required)) if on)
    raise PrivacyPolicyViolation(f"run config moe.experts trains a router without DP-SGD and sends it unmasked, but "
                                 f"this institution requires {required}; start the client with --allow-no-dp "
                                 f"--allow-unmasked to allow router training")


def router_train_content(content: RecordDict, context: Context) -> RecordDict:
    """Train the received global router on this institution's rows; reply with the router and the loss."""
    cfg = FinloraConfig.from_flat(context.run_config)
    node = NodeSettings.parse(context.node_config)
    enforce_router_policy(node)  # before the mixture, the data or the ledger is touched
    mixture, tokenizer = cached_mixture(cfg)
    load_router_state(mixture, content["arrays"].to_torch_state_dict(), "global router from the server")
    data = local_data(cfg.data, node.data_key, tokenizer)
    server_round = int(content["config"]["server-round"])
    start = time.perf_counter()
    losses = train_router_on(mixture, tokenizer, data.train, cfg.train.local_steps, cfg.train.batch_size,
                             cfg.train.lr, cfg.train.seed + 1000 * server_round + node.partition_id, progress=False)
    arrays = ArrayRecord(router_state(mixture))
    metrics = MetricRecord({"num-examples": len(data.train), "train-loss": sum(losses) / len(losses),
                            "train-steps": len(losses), "train-seconds": time.perf_counter() - start,
                            "bytes-sent": arrays.count_bytes(), "process-id": os.getpid()})
    return RecordDict({"arrays": arrays, "metrics": metrics})
