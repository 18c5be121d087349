"""Federated training of a mixture-of-experts router (``moe.experts``): the ServerApp's other kind of run.

Every institution holds the same frozen experts (per-task LoRA adapters) and trains only the X-LoRA router on its
own data (:mod:`client.router_task`). The round is a LoRA round with another set of tensors: the same strategy
wrapper (:class:`server.strategy.LoraStrategy` around Flower's FedAvg) checks every reply or, with zk, verifies its
signature and proof and aggregates the committed integers, under secure aggregation without ever seeing one
router; institutions train with DP-SGD against their own ledgers. Each round the server scores the global mixture
on the held-out rows and saves it as a mixture directory (``round-<k>/``: ``moe.json`` + ``router.safetensors``,
written atomically), which ``finlora eval --moe`` and ``finlora serve --moe`` load as they are; with zk the ledger
line of the round names that ``router.safetensors``, so ``finlora zk audit`` checks routers as it checks adapters.

A run resumes (``resume``) from its last saved round, as a LoRA run does: rounds are numbered on from there, and
nothing saved before is rewritten. Not here: server optimizers (FedAdam/FedYogi), FedProx's proximal term and
client-level DP (``check_combinations`` refuses them for a router run).
"""

from __future__ import annotations

import dataclasses
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from finlora.common.config import FinloraConfig, parse_experts
from finlora.common.data import encode_rows, load_rows, split_heldout
from finlora.common.evaluation import answer_loss
from finlora.common.model import load_base_model
from finlora.common.moe import (LAYER_SIZE, ROUTER_FILE, build_mixture, check_experts, load_router_state,
                                load_router_weights, router_state, save_mixture)
from finlora.server.checkpoint import RunDirectory
from finlora.server.recorder import round_summary
from finlora.server.strategy import LoraStrategy, make_strategy
from finlora.server.zk_round import ZkLedger, ZkVerifier


def router_strategy(cfg: FinloraConfig, router_shapes: dict[str, tuple[int, ...]], round_offset: int,
                    verifier: ZkVerifier | None) -> LoraStrategy:
    """The round of a LoRA run over the router's tensors (replies checked, or verified and aggregated as committed
    integers with zk), without federated evaluation: institutions score adapters; the server scores the mixture on
    its held-out rows."""
    return make_strategy(dataclasses.replace(cfg.strategy, fraction_evaluate=0.0), router_shapes,
                         round_offset=round_offset, zk=verifier)


def run_router_federation(grid: Grid, cfg: FinloraConfig, flower_run_id: int) -> None:
    """Train ``moe.experts``' router for ``num-rounds`` rounds, saving and scoring the global mixture each round."""
    import torch

    run_id = cfg.run_name(flower_run_id)
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
    verifier = ZkVerifier.for_run(cfg, flower_run_id, run_dir.path)
    ledger = ZkLedger.of(verifier, artifact=ROUTER_FILE) if verifier is not None else None
    strategy = router_strategy(cfg, {k: tuple(v.shape) for k, v in router.items()}, offset, verifier)
    log(INFO, "finlora router run %s: %s (%s), %d experts [%s], router %d tensors (%.1f kB), rounds %d..%d, "
        "output %s", run_id, cfg.model.name, effective, len(experts), ", ".join(experts), len(initial),
        initial.count_bytes() / 1e3, offset + 1, cfg.num_rounds, run_dir.path)

    def save_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The global mixture of this round: scored on the held-out rows, saved, its metrics line appended. (Flower
        calls it with round 0 first: in a resumed run that is the saved round, which is not rewritten.)"""
        if server_round == 0 and offset:
            return None
        server_round += offset
        outcome = strategy.outcome(server_round) if server_round > 0 else None
        load_router_state(mixture, arrays.to_torch_state_dict(), f"round {server_round}'s aggregate")
        loss = answer_loss(mixture, held, cfg.eval.batch_size, tokenizer.pad_token_id)[0] if held else None
        save_mixture(mixture, experts, run_dir.round_dir(server_round), cfg.moe.depth, LAYER_SIZE, None,
                     cfg.model.name, metadata={"round": server_round, "run": run_id})
        if ledger is not None:  # after the router file: the line holds its hash
            ledger.record_outcome(server_round, outcome)
        if outcome is not None:
            run_dir.append_wire(list(outcome.wire))
        run_dir.append_metrics({**round_summary(server_round, outcome, loss, strategy.weighting), "router": True})
        log(INFO, "round %d: router saved to %s (held-out loss %s)", server_round, run_dir.round_dir(server_round),
            "n/a" if loss is None else f"{loss:.4f}")
        return MetricRecord({"heldout-loss": loss}) if loss is not None else None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_rounds - offset,
                   timeout=cfg.strategy.round_timeout,
                   train_config=ConfigRecord({"num-rounds": cfg.num_rounds}), evaluate_fn=save_round)
