"""Federated training of a mixture-of-experts router (``moe.experts``): the ServerApp's other kind of run.

Every institution holds the same frozen experts (per-task LoRA adapters) and trains only the X-LoRA router on its
own data (:mod:`client.router_task`); Flower's FedAvg averages the routers, weighted by example counts. Each round
the server scores the global mixture on the held-out rows and saves it as a mixture directory (``round-<k>/``:
``moe.json`` + ``router.safetensors``, written atomically), which ``finlora eval --moe`` and ``finlora serve --moe``
load as they are. Replies are checked as LoRA updates are (:func:`server.strategy.update_problem`): a malformed,
non-finite or out-of-bound router is left out with its reason, never fails the run.

A run resumes (``resume``) from its last saved round, as a LoRA run does: rounds are numbered on from there, and
nothing saved before is rewritten. What this run does not do (yet): DP-SGD, zk proofs and secure aggregation cover
LoRA updates only, so ``check_combinations`` requires them off.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from finlora.common.adapter import from_array_record
from finlora.common.config import FinloraConfig, parse_experts
from finlora.common.data import encode_rows, load_rows, split_heldout
from finlora.common.evaluation import answer_loss
from finlora.common.model import load_base_model
from finlora.common.moe import (LAYER_SIZE, build_mixture, check_experts, load_router_state, load_router_weights,
                                router_state, save_mixture)
from finlora.server.checkpoint import RunDirectory
from finlora.server.strategy import NodeWaitDeadline, update_problem

class RouterFedAvg(FedAvg):
    """Flower's FedAvg over the router, with finlora's reply checks and a bounded wait for institutions."""

    def __init__(self, cfg: FinloraConfig, router_shapes: dict[str, tuple[int, ...]], round_offset: int = 0) -> None:
        s = cfg.strategy
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_train_nodes,
                         min_available_nodes=s.min_available_nodes)
        self.shapes = router_shapes
        self.max_update_norm, self.max_examples, self.timeout = s.max_update_norm, s.max_examples, s.round_timeout
        self.round_offset = round_offset
        """Rounds already done when this process started (a resumed run): Flower counts from 1 again."""
        self.current: dict[str, Any] = {}
        self.rounds: dict[int, dict[str, Any]] = {}
        """Per absolute round: accepted clients' metrics, rejected and failed institutions with reasons, seconds."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset  # what institutions see (their seeds) and the records use
        self.current = from_array_record(arrays)
        self.rounds[absolute] = {"started": time.perf_counter(), "clients": {}, "rejected": {}, "errors": {}}
        needed = max(self.min_available_nodes, self.min_train_nodes)
        return super().configure_train(absolute, arrays, config,
                                       NodeWaitDeadline(grid, self.timeout, needed, f"round {absolute}"))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid routers; fewer than ``min_train_nodes`` valid ones keep the previous router."""
        server_round += self.round_offset
        rec = self.rounds[server_round]
        contents = []
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                rec["errors"][node] = msg.error.reason[:300]
                continue
            problem, _ = update_problem(msg.content, self.shapes, self.current, self.max_update_norm,
                                        self.max_examples, zk=False)
            if problem:
                rec["rejected"][node] = problem
                log(WARNING, "round %d: rejected the router of node %s: %s", server_round, node, problem)
                continue
            metrics = dict(msg.content["metrics"])
            rec["clients"][node] = {"num_examples": int(metrics["num-examples"]),
                                    "train_loss": float(metrics["train-loss"]),
                                    "bytes_sent": int(msg.content["arrays"].count_bytes())}
            # only what the average needs reaches Flower's arithmetic (an extra metric key cannot break it)
            contents.append(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(
                {"num-examples": metrics["num-examples"]})}))
        clients = rec["clients"].values()
        if clients:
            rec["train_loss"] = sum(c["train_loss"] * c["num_examples"] for c in clients) / sum(
                c["num_examples"] for c in clients)
        if len(contents) < max(1, self.min_train_nodes):
            rec["kept_previous"] = (f"round {server_round}: {len(contents)} valid router(s), fewer than "
                                    f"strategy.min-train-nodes = {self.min_train_nodes}; the previous router is kept")
            log(WARNING, "%s", rec["kept_previous"])
            return None, None
        return aggregate_arrayrecords(contents, self.weighted_by_key), MetricRecord({"train-loss": rec["train_loss"]})


def run_router_federation(grid: Grid, cfg: FinloraConfig, run_id: str) -> None:
    """Train ``moe.experts``' router for ``num-rounds`` rounds, saving and scoring the global mixture each round."""
    import torch

    experts = check_experts(parse_experts(cfg.moe.experts, "moe.experts"))
    run_dir = RunDirectory(cfg.resolved_out_dir() / run_id)
    model, tokenizer, effective = load_base_model(cfg.model)
    torch.manual_seed(cfg.lora.seed)  # the initial router: the same for a given seed
    mixture = build_mixture(model, experts, depth=cfg.moe.depth).eval()
    offset = 0
    if cfg.resume:
        offset = run_dir.resume_round()
        load_router_weights(mixture, run_dir.round_dir(offset))
        log(INFO, "resuming %s after round %d of %d", run_dir.path, offset, cfg.num_rounds)
    else:
        run_dir.start_fresh()
        run_dir.save_config(cfg.to_flat())
    if offset >= cfg.num_rounds:
        log(INFO, "all %d rounds are done already", cfg.num_rounds)
        return
    held = []
    if cfg.eval.heldout:
        held = encode_rows(split_heldout(load_rows(cfg.data), cfg.data.heldout_size, cfg.data.seed)[1], tokenizer,
                           cfg.data.max_length)
    router = router_state(mixture)
    initial = ArrayRecord(router)
    strategy = RouterFedAvg(cfg, {k: tuple(v.shape) for k, v in router.items()}, offset)
    log(INFO, "finlora router run %s: %s (%s), %d experts [%s], router %d tensors (%.1f kB), rounds %d..%d, "
        "output %s", run_id, cfg.model.name, effective, len(experts), ", ".join(experts), len(initial),
        initial.count_bytes() / 1e3, offset + 1, cfg.num_rounds, run_dir.path)

    def save_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The global mixture of this round: scored on the held-out rows, saved, its metrics line appended. (Flower
        calls it with round 0 first: in a resumed run that is the saved round, which is not rewritten.)"""
        if server_round == 0 and offset:
            return None
        server_round += offset
        load_router_state(mixture, arrays.to_torch_state_dict(), f"round {server_round}'s aggregate")
        loss = answer_loss(mixture, held, cfg.eval.batch_size, tokenizer.pad_token_id)[0] if held else None
        save_mixture(mixture, experts, run_dir.round_dir(server_round), cfg.moe.depth, LAYER_SIZE, None,
                     cfg.model.name, metadata={"round": server_round, "run": run_id})
        info = strategy.rounds.get(server_round, {})
        clients = info.get("clients", {})
        record = {"round": server_round, "heldout_loss": loss, "num_clients": len(clients),
                  "train_loss": info.get("train_loss"),
                  "seconds": round(time.perf_counter() - info["started"], 2) if info else 0.0,
                  "bytes_sent_per_client": (sum(c["bytes_sent"] for c in clients.values()) // len(clients)
                                            if clients else 0),
                  "clients": clients, "rejected": info.get("rejected", {}), "errors": info.get("errors", {}),
                  "kept_previous": info.get("kept_previous"), "router": True}
        run_dir.append_metrics(record)
        log(INFO, "round %d: router saved to %s (held-out loss %s)", server_round, run_dir.round_dir(server_round),
            "n/a" if loss is None else f"{loss:.4f}")
        return MetricRecord({"heldout-loss": loss}) if loss is not None else None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_rounds - offset,
                   timeout=cfg.strategy.round_timeout,
                   train_config=ConfigRecord({"num-rounds": cfg.num_rounds}), evaluate_fn=save_round)
