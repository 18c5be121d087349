"""The finlora ServerApp: runs the rounds, checkpoints every global adapter, logs metrics, resumes."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.adapter import complete_with_shared_a, from_array_record, initial_adapter, select_keys, to_array_record
from common.config import FinloraConfig
from common.dp_accounting import epsilon_of
from common.model import lora_config, lora_shapes, resolve_model_path
from server.checkpoint import RunDirectory
from server.benchmark_eval import run_benchmark_evals
from server.heldout import HeldoutEvaluator
from server.zk_round import ZkVerifier
from server.strategy import (RoundRecord, make_strategy, optimizer_state, restore_optimizer_state,
                             sampled_clients_per_round, with_client_level_dp)

app = ServerApp()


class RoundFailedError(RuntimeError):
    """A round ended without an aggregated adapter: the run must not report success."""


def round_summary(server_round: int, rec: RoundRecord | None, heldout_loss: float | None,
                  weighting: str = "examples") -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a round (``weighting``: how the server weighed the accepted updates)."""
    clients = rec.clients if rec else {}
    examples = sum(c["num_examples"] for c in clients.values())  # every accepted reply has both (server/strategy)
    train_loss = (sum(c["train_loss"] * c["num_examples"] for c in clients.values()) / examples
                  if examples else None)
    eval_clients = rec.client_eval if rec else {}
    eval_examples = sum(c["num-examples"] for c in eval_clients.values())
    return {
        "round": server_round,
        "train_loss": train_loss,
        "heldout_loss": heldout_loss,
        "federated_eval_loss": (sum(c["eval-loss"] * c["num-examples"] for c in eval_clients.values())
                                / eval_examples if eval_examples else None),
        "seconds": (time.perf_counter() - rec.started) if rec else 0.0,
        "aggregate_seconds": rec.aggregate_seconds if rec else 0.0,
        "num_clients": len(clients),
        "bytes_sent_per_client": (sum(c.get("bytes_sent", 0) for c in clients.values()) / len(clients)) if clients else 0,
        "bytes_received_per_client": (max((w["array_bytes"] for w in rec.wire if w["direction"] == "server->client"),
                                          default=0) if rec else 0),
        "clients": clients,
        "privacy": {node: {k[3:]: v for k, v in c.items() if k.startswith("dp_")} | {"partition_id": c.get("partition_id")}
                    for node, c in clients.items() if "dp_epsilon" in c},
        "refused": sorted(node for node, reason in (rec.errors if rec else {}).items()
                          if "PrivacyBudgetExhausted" in reason or "PrivacyPolicyViolation" in reason),
        "rejected": rec.rejected if rec else {},
        "eval_rejected": rec.eval_rejected if rec else {},
        "weighting": weighting,
        "kept_previous": rec.kept_previous if rec else "",
        "errors": rec.errors if rec else {},
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds (or the rest of them with ``resume``), saving every round's adapter."""
    cfg = FinloraConfig.from_flat(context.run_config).check_combinations()
    run_id = cfg.run_name(context.run_id)
    run_dir = RunDirectory(cfg.resolved_out_dir() / run_id)
    base_path = resolve_model_path(cfg.model.name)
    peft_config = lora_config(cfg.lora, base_path)
    shapes = lora_shapes(cfg.model, cfg.lora)
    wire_shapes = {k: s for k, s in shapes.items() if k in select_keys(dict.fromkeys(shapes), cfg.lora.ffa)}
    evaluator = HeldoutEvaluator(cfg) if cfg.eval.heldout else None

    def full_adapter(arrays: ArrayRecord) -> dict[str, Any]:
        return complete_with_shared_a(from_array_record(arrays), shapes, cfg.lora.seed)

    if cfg.resume:
        offset, global_arrays = run_dir.resume_point()
        log(INFO, "resuming %s after round %d of %d", run_dir.path, offset, cfg.num_rounds)
        saved_moments = run_dir.optimizer_state(offset)
        changed = changed_settings(run_dir.saved_config(), cfg.to_flat())
        if changed:
            log(WARNING, "resuming with settings that differ from the run's start: %s", ", ".join(changed))
    else:
        run_dir.start_fresh()
        offset, global_arrays, saved_moments = 0, initial_adapter(shapes, cfg.lora.seed), None
        run_dir.save_config(cfg.to_flat())
    remaining = cfg.num_rounds - offset
    log(INFO, "finlora run %s: %s, %d LoRA tensors (%d travel), rounds %d..%d, output %s", run_id, cfg.model.name,
        len(shapes), len(wire_shapes), offset + 1, cfg.num_rounds, run_dir.path)
    if remaining <= 0:
        log(INFO, "all %d rounds are already complete", cfg.num_rounds)
        return

    client_level = cfg.dp.enabled and cfg.dp.level == "client"
    verifier = (ZkVerifier.open(cfg.zk, cfg.signed_run_id(context.run_id), run_dir.path,
                                Path(cfg.zk.keys_dir) if cfg.zk.keys_dir else run_dir.path / "keys",
                                equal_weights=cfg.strategy.weighting == "equal") if cfg.zk.enabled else None)
    strategy = make_strategy(cfg.strategy, wire_shapes, round_offset=offset, zk=verifier,
                             client_level_clip=cfg.dp.max_grad_norm if client_level else None)
    if saved_moments and cfg.strategy.name in ("fedadam", "fedyogi"):
        restore_optimizer_state(strategy, saved_moments)
        log(INFO, "restored the %s moments saved with round %d", cfg.strategy.name, offset)
    elif offset > 0 and cfg.strategy.name in ("fedadam", "fedyogi"):
        log(WARNING, "no %s moments were saved with round %d: they restart from zero", cfg.strategy.name, offset)
    runner: Any = strategy
    if client_level:
        runner = with_client_level_dp(strategy, cfg.dp.noise_multiplier, cfg.dp.max_grad_norm,
                                      sampled_clients_per_round(cfg.strategy))

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        absolute = server_round + offset
        if server_round == 0 and offset > 0:
            return None  # the resumed round was evaluated and saved before the restart
        rec = strategy.rounds.get(absolute)
        if server_round > 0 and (rec is None or not rec.aggregated):
            # Flower hands us the previous global arrays: the round is saved with them and says why
            rec = rec or strategy.record(absolute)
            rec.kept_previous = rec.kept_previous or _failure_reason(absolute, rec)
            log(WARNING, "round %d kept the previous global adapter: %s", absolute, rec.kept_previous)
        elif server_round > 0:
            aggregated_rounds.append(absolute)
        full = full_adapter(arrays)
        heldout = evaluator.loss(full) if evaluator else None
        summary = round_summary(absolute, rec, heldout, strategy.weighting)
        if client_level:
            summary["client_level_privacy"] = client_level_privacy(cfg, absolute)
        evaluations = run_benchmark_evals(cfg, absolute, full, run_dir.path)
        if evaluations:
            summary["eval"] = evaluations
        run_dir.save_round(absolute, full, peft_config, summary, optimizer_state=optimizer_state(strategy))
        if verifier is not None:
            if absolute == 0:
                verifier.write_header()
            elif rec is not None and rec.kept_previous:
                verifier.record_kept(absolute, dict(rec.rejected), rec.kept_previous)
            elif rec is not None and rec.zk is not None:
                verifier.record(absolute, rec.zk)
        if rec:
            run_dir.append_wire(rec.wire)
        log(INFO, "round %d saved to %s (held-out loss %s)", absolute, run_dir.round_dir(absolute),
            f"{heldout:.4f}" if heldout is not None else "n/a")
        return MetricRecord({"heldout-loss": heldout}) if heldout is not None else None

    aggregated_rounds: list[int] = []
    runner.start(grid=grid, initial_arrays=to_array_record(select_keys(global_arrays, cfg.lora.ffa)),
                   num_rounds=remaining, timeout=cfg.strategy.round_timeout,
                   train_config=ConfigRecord({"num-rounds": cfg.num_rounds}),
                   evaluate_config=ConfigRecord({"num-rounds": cfg.num_rounds}), evaluate_fn=after_round)
    _log_summary_table(run_dir)
    if not aggregated_rounds:  # every round of this run kept the adapter it started from: nothing was learned
        raise RoundFailedError(f"rounds {offset + 1}..{cfg.num_rounds}: no round aggregated an update (see "
                               f"'rejected' and 'errors' in {run_dir.metrics_path})")


RESUMABLE_CHANGES = ("num-rounds", "resume", "out-dir", "eval.", "strategy.round-timeout", "data.dir", "zk.keys-dir",
                     "zk.registry")
"""Settings a resumed run may change without changing what it trains (prefixes of flat keys)."""


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every training setting a resumed run changed."""
    return [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in sorted(saved)
            if not k.startswith(RESUMABLE_CHANGES) and saved[k] != current.get(k)]


def client_level_privacy(cfg: FinloraConfig, rounds: int) -> dict[str, float]:
    """(epsilon, delta) protecting each institution's whole contribution after ``rounds`` noisy releases.

    Accounted without amplification by sampling (q = 1), as Flower's own fixed-clipping accountant does:
    Flower samples a fixed-size subset of institutions, not a Poisson one.
    """
    delta = cfg.dp.delta if cfg.dp.delta > 0 else 1.0 / (10 * cfg.strategy.min_available_nodes)
    epsilon = (epsilon_of([(cfg.dp.noise_multiplier, 1.0, rounds)], delta, cfg.dp.accountant)
               if cfg.dp.noise_multiplier > 0 else None)  # no noise: clipping alone guarantees nothing
    return {"epsilon": epsilon,
            "delta": delta, "sigma": cfg.dp.noise_multiplier, "clipping_norm": cfg.dp.max_grad_norm,
            "rounds": rounds}


def _failure_reason(server_round: int, rec: RoundRecord | None) -> str:
    if rec is None:
        return f"round {server_round}: no training replies arrived"
    return (f"round {server_round}: nothing was aggregated ({len(rec.clients)} accepted, "
            f"{len(rec.rejected)} rejected: {rec.rejected}, {len(rec.errors)} errors: {rec.errors})")


def _log_summary_table(run_dir: RunDirectory) -> None:
    log(INFO, "%-6s %-11s %-13s %-9s %s", "round", "train loss", "held-out loss", "seconds", "bytes/client")
    for r in run_dir.metrics():
        log(INFO, "%-6d %-11s %-13s %-9.1f %d", r["round"],
            "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
            "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}", r["seconds"],
            r["bytes_sent_per_client"])
