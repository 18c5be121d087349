"""The finlora ServerApp: sets up a run (fresh or resumed), then lets the strategy wrapper run the rounds and the
recorder write each one (``server/strategy.py``, ``server/recorder.py``)."""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from finlora.common.adapter import (complete_with_shared_a, from_array_record, initial_adapter, select_keys,
                                    to_array_record)
from finlora.common.config import FinloraConfig
from finlora.common.dp_accounting import epsilon_of
from finlora.common.model import lora_config, lora_shapes, resolve_model_path
from finlora.server.checkpoint import RunDirectory
from finlora.server.heldout import HeldoutEvaluator
from finlora.server.recorder import RoundRecorder
from finlora.server.router_round import run_router_federation
from finlora.server.strategy import (make_strategy, optimizer_state, restore_optimizer_state, sampled_clients_per_round,
                                     server_optimizer_of, with_client_level_dp)
from finlora.server.zk_round import ZkLedger, ZkVerifier

app = ServerApp()


class RoundFailedError(RuntimeError):
    """A round ended without an aggregated adapter: the run must not report success."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds (or the rest of them with ``resume``), saving every round's adapter."""
    cfg = FinloraConfig.from_flat(context.run_config).check_combinations()
    run_id = cfg.run_name(context.run_id)
    if cfg.moe.experts:  # the run trains a mixture's router, not a LoRA adapter
        run_router_federation(grid, cfg, context.run_id)
        return
    run_dir = RunDirectory(cfg.resolved_out_dir() / run_id)
    base_path = resolve_model_path(cfg.model.name)
    peft_config = lora_config(cfg.lora, base_path)
    shapes = lora_shapes(cfg.model, cfg.lora)
    wire_shapes = {k: s for k, s in shapes.items() if k in select_keys(dict.fromkeys(shapes), cfg.lora.ffa)}

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
    verifier = ZkVerifier.for_run(cfg, context.run_id, run_dir.path)
    strategy = make_strategy(cfg.strategy, wire_shapes, round_offset=offset, zk=verifier,
                             client_level_clip=cfg.dp.max_grad_norm if client_level else None)
    if saved_moments and cfg.strategy.name in ("fedadam", "fedyogi"):
        restore_optimizer_state(strategy, saved_moments)
        log(INFO, "restored the %s moments saved with round %d", cfg.strategy.name, offset)
    elif offset > 0 and cfg.strategy.name in ("fedadam", "fedyogi"):
        log(WARNING, "no %s moments were saved with round %d: they restart from zero", cfg.strategy.name, offset)
    runner: Strategy = strategy
    if client_level:
        runner = with_client_level_dp(strategy, cfg.dp.noise_multiplier, cfg.dp.max_grad_norm,
                                      sampled_clients_per_round(cfg.strategy))
    recorder = RoundRecorder(
        cfg, run_dir, peft_config, strategy.weighting, evaluator=HeldoutEvaluator(cfg) if cfg.eval.heldout else None,
        ledger=ZkLedger.of(verifier, server_optimizer_of(strategy)) if verifier is not None else None,
        extra_summary=(lambda rounds: {"client_level_privacy": client_level_privacy(cfg, rounds)})
        if client_level else None)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluate_fn, called once a round (training and federated evaluation) has ended."""
        absolute = server_round + offset
        if server_round == 0 and offset > 0:
            return None  # the resumed round was evaluated and saved before the restart
        outcome = strategy.outcome(absolute) if server_round > 0 else None
        heldout = recorder.record(absolute, full_adapter(arrays), outcome, optimizer_state(strategy))
        return MetricRecord({"heldout-loss": heldout}) if heldout is not None else None

    runner.start(grid=grid, initial_arrays=to_array_record(select_keys(global_arrays, cfg.lora.ffa)),
                 num_rounds=remaining, timeout=cfg.strategy.round_timeout,
                 train_config=ConfigRecord({"num-rounds": cfg.num_rounds}),
                 evaluate_config=ConfigRecord({"num-rounds": cfg.num_rounds}), evaluate_fn=after_round)
    _log_summary_table(run_dir)
    if not recorder.aggregated_rounds:  # every round of this run kept the adapter it started from: nothing learned
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


def _log_summary_table(run_dir: RunDirectory) -> None:
    log(INFO, "%-6s %-11s %-13s %-9s %s", "round", "train loss", "held-out loss", "seconds", "bytes/client")
    for r in run_dir.metrics():
        log(INFO, "%-6d %-11s %-13s %-9.1f %d", r["round"],
            "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
            "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}", r["seconds"],
            r["bytes_sent_per_client"])
