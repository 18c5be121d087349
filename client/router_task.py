"""One federated round of a mixture's router (``moe.experts`` set): the institution loads the global router into
its mixture (its base model with the frozen experts), trains the router on its own data and replies with the router
only: 878 bytes on the tiny model with two experts, where its LoRA update is 31 kB. DP-SGD, commitments, proofs and
secure aggregation cover the router exactly as they cover a LoRA adapter.

The task runs wherever :data:`client.tasks.TASKS` runs ("train"): in a simulation's Ray actor or in the
institution's resident trainer, which keeps the mixture loaded between rounds in :data:`MIXTURE_CACHE`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from flwr.app import Context, MetricRecord, RecordDict

from finlora.client.dp_setup import enforce_policy
from finlora.client.local_data import local_data
from finlora.client.moe_train import train_router_on
from finlora.client.node_settings import NodeSettings
from finlora.client.privacy_engine import InstitutionPrivacyEngine
from finlora.client.secagg_stage import enforce_masking
from finlora.client.update_reply import update_records
from finlora.common.adapter import from_array_record
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


def router_train_content(content: RecordDict, context: Context) -> RecordDict:
    """Train the received global router on this institution's rows and reply with it, as a LoRA round replies with
    its adapter: under the same privacy policy (DP-SGD with the institution's own ledger, secure aggregation where
    its node config requires them) and through the same update path (:func:`client.update_reply.update_records`:
    committed, proven and masked with zk)."""
    import torch  # with the model, as everywhere on the task path

    cfg = FinloraConfig.from_flat(context.run_config)
    node = NodeSettings.parse(context.node_config)
    enforce_masking(cfg.zk, node)  # before the mixture, the data or the ledger is touched
    mixture, tokenizer = cached_mixture(cfg)
    received = from_array_record(content["arrays"])
    load_router_state(mixture, {k: torch.from_numpy(np.array(v)) for k, v in received.items()},
                      "global router from the server")
    data = local_data(cfg.data, node.data_key, tokenizer)
    enforce_policy(cfg.dp, node, len(data.train))  # before any training or ledger access
    server_round = int(content["config"]["server-round"])
    seed = cfg.train.seed + 1000 * server_round + node.partition_id
    start = time.perf_counter()
    privacy: dict[str, float] = {}
    if cfg.dp.enabled:  # sample level: check_combinations refuses a router run with client-level DP
        engine = InstitutionPrivacyEngine(cfg, node, context.state, len(data.train))
        stats = engine.train_round(mixture, data.train, cfg.train.lr, tokenizer.pad_token_id, seed)
        loss, steps, privacy = stats.loss, stats.steps, engine.report()
    else:
        losses = train_router_on(mixture, tokenizer, data.train, cfg.train.local_steps, cfg.train.batch_size,
                                 cfg.train.lr, seed, progress=False)
        loss, steps = sum(losses) / len(losses), len(losses)
    train_seconds = time.perf_counter() - start
    local = {k: v.numpy() for k, v in router_state(mixture).items()}
    update = update_records(cfg, node, context.run_id, local, received, server_round, len(data.train), seed,
                            context.state)
    metrics = MetricRecord({"num-examples": len(data.train), "train-loss": loss, "train-steps": steps,
                            "train-seconds": train_seconds, "process-id": os.getpid(),
                            "bytes-sent": update.arrays.count_bytes() + update.extra_bytes,
                            "partition-id": node.partition_id, **privacy, **update.metrics})
    return RecordDict({"arrays": update.arrays, "metrics": metrics, **update.extra})
