"""What an institution does with a task from the server: train the global LoRA adapter on local data (plain or
DP-SGD) and reply with only A/B (or B), or measure the adapter's loss on local validation rows.

Kept apart from the Flower ``ClientApp`` (``client/app.py``) because two processes run these functions: the
ClientApp itself (simulation) and the institution's resident trainer (``client/resident``), which keeps the base
model loaded between rounds. :data:`TASKS` is the one table both dispatch through.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from finlora.client.dp_setup import enforce_policy
from finlora.client.local_data import LocalData, local_data
from finlora.client.node_settings import NodeSettings
from finlora.client.privacy_engine import InstitutionPrivacyEngine
from finlora.client.router_task import router_train_content
from finlora.client.secagg_stage import enforce_masking, peer_keys, secagg_stage
from finlora.client.train import TrainStats, round_learning_rate, train_round
from finlora.client.update_reply import update_records, zk_keys_dir
from finlora.client.zk_update import signing_key_file
from finlora.common.adapter import (Arrays, check_arrays, from_array_record, initial_adapter, load_lora_state,
                                    lora_state, select_keys, shapes_of)
from finlora.common.config import FinloraConfig
from finlora.common.evaluation import answer_loss
from finlora.common.model import LOAD_COUNTS, ModelBundle, QUANTIZATION_BITS, get_model_bundle
from finlora.zk.secagg_codec import SECAGG_RECORD
from finlora.zk.signing import load_private_key


@dataclass(frozen=True)
class Prepared:
    """What every task starts from: the config, the cached model with the received global adapter loaded into it,
    the local data, that adapter (all tensors, FFA's frozen A filled in) and the seconds a base-model load took
    in this task (0 when the model was already resident)."""

    cfg: FinloraConfig
    node: NodeSettings
    bundle: ModelBundle
    data: LocalData
    received: Arrays
    load_seconds: float


def prepare(content: RecordDict, context: Context) -> Prepared:
    """Config, cached model, local data, and the received global adapter loaded into the model."""
    cfg = FinloraConfig.from_flat(context.run_config)
    node = NodeSettings.parse(context.node_config)
    loads_before = LOAD_COUNTS["base_model_loads"]
    bundle = get_model_bundle(cfg.model, cfg.lora)
    load_seconds = bundle.load_seconds if LOAD_COUNTS["base_model_loads"] > loads_before else 0.0
    data = local_data(cfg.data, node.data_key, bundle.tokenizer)
    own = lora_state(bundle.model)
    received = from_array_record(content["arrays"])
    check_arrays(received, shapes_of(select_keys(own, cfg.lora.ffa)), "global adapter from the server")
    if cfg.lora.ffa:
        # A never travels in FFA-LoRA: every party derives the same frozen A from the shared seed.
        received = {**initial_adapter(shapes_of(own), cfg.lora.seed), **received}
    load_lora_state(bundle.model, received)
    return Prepared(cfg, node, bundle, data, received, load_seconds)


def train_locally(cfg: FinloraConfig, node: NodeSettings, bundle: ModelBundle, data: LocalData, state: Any,
                  config: Any, received: Arrays, lr: float, seed: int) -> tuple[TrainStats, dict[str, float]]:
    """Plain or DP-SGD training; with DP, the privacy ledger is checked first and saved after."""
    mu = float(config.get("proximal-mu", 0.0))
    pad = bundle.tokenizer.pad_token_id
    if not (cfg.dp.enabled and cfg.dp.level == "sample"):
        return train_round(bundle.model, data.train, cfg.train, lr, pad, seed=seed, proximal_mu=mu,
                           global_arrays=received), {}
    engine = InstitutionPrivacyEngine(cfg, node, state, len(data.train))
    # raises PrivacyBudgetExhausted before training: the server logs it and goes on
    stats = engine.train_round(bundle.model, data.train, lr, pad, seed, proximal_mu=mu, global_arrays=received)
    return stats, engine.report()


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """One round of local training; replies with the adapter's trainable tensors and training metrics (or, when the
    run trains a mixture's router, ``moe.experts``, with the router: :mod:`client.router_task`)."""
    if context.run_config.get("moe.experts"):
        return router_train_content(content, context)
    prepared = prepare(content, context)
    cfg, node, bundle, data, received = prepared.cfg, prepared.node, prepared.bundle, prepared.data, prepared.received
    enforce_policy(cfg.dp, node, len(data.train))  # before any training or ledger access
    enforce_masking(cfg.zk, node)
    config = content["config"]
    server_round = int(config["server-round"])
    lr = round_learning_rate(cfg.train, server_round, cfg.num_rounds)
    seed = cfg.train.seed + 1000 * server_round + node.partition_id
    stats, privacy = train_locally(cfg, node, bundle, data, context.state, config, received, lr, seed)
    start = time.perf_counter()
    local = select_keys(lora_state(bundle.model), cfg.lora.ffa)
    update = update_records(cfg, node, context.run_id, local, select_keys(received, cfg.lora.ffa), server_round,
                            len(data.train), seed, context.state)
    serialize_seconds = time.perf_counter() - start
    metrics = MetricRecord({
        "num-examples": len(data.train),
        "train-loss": stats.loss,
        "train-steps": stats.steps,
        "train-tokens": stats.tokens,
        "answer-tokens": stats.answer_tokens,
        "train-seconds": stats.seconds,
        "lr": stats.lr,
        "load-seconds": prepared.load_seconds,
        "serialize-seconds": serialize_seconds,
        "base-model-loads": LOAD_COUNTS["base_model_loads"],
        "base-quantization-bits": QUANTIZATION_BITS[bundle.quantized],  # what was really loaded, not asked for
        "process-id": os.getpid(),  # shows whether one process (a resident trainer) served several rounds
        "bytes-sent": update.arrays.count_bytes() + update.extra_bytes,
        "partition-id": node.partition_id,
        **privacy,
        **update.metrics,
    })
    return RecordDict({"arrays": update.arrays, "metrics": metrics, **update.extra})


def secagg_content(content: RecordDict, context: Context) -> RecordDict:
    """One secure-aggregation stage (``query.secagg``): light crypto on what training left in the node's state."""
    cfg = FinloraConfig.from_flat(context.run_config)
    node = NodeSettings.parse(context.node_config)
    keys_dir = zk_keys_dir(cfg, context.run_id)
    key = load_private_key(signing_key_file(node, keys_dir))
    fields = dict(content.config_records[SECAGG_RECORD])
    reply = secagg_stage(fields, context.state, key, peer_keys(node.zk_peers, keys_dir), cfg.zk.bits,
                         cfg.strategy.weighting == "equal")
    return RecordDict({SECAGG_RECORD: ConfigRecord(reply)})


def evaluate_content(content: RecordDict, context: Context) -> RecordDict:
    """Loss of the global adapter on this institution's validation rows (never trained on)."""
    prepared = prepare(content, context)
    data, bundle = prepared.data, prepared.bundle
    loss, tokens = answer_loss(bundle.model, data.val, prepared.cfg.eval.batch_size, bundle.tokenizer.pad_token_id)
    metrics = MetricRecord({"eval-loss": loss, "eval-tokens": tokens, "num-examples": len(data.val),
                            "base-model-loads": LOAD_COUNTS["base_model_loads"],
                            "process-id": os.getpid()})
    return RecordDict({"metrics": metrics})


TASKS = {"train": train_content, "evaluate": evaluate_content, "secagg": secagg_content}
"""What a task kind runs, given the message content and the node's context (also used by the resident trainer)."""
