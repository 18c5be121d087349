"""Train a mixture's router on an institution's (multi-task) data: ``finlora moe train``.

The experts stay frozen; only the router learns which expert to weight for which tokens. The loss is the usual
answer-only causal-LM loss (prompt tokens masked), computed by the model itself: X-LoRA's two passes (read the
hidden states, then apply the weighted experts) do not fit finlora's answer-only head, and the router is small.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finlora.common.config import ConfigError, load_config
from finlora.common.data import (DataError, Example, Row, collate, encode_rows, length_grouped_batches,
                                 read_jsonl)
from finlora.common.logs import get_logger
from finlora.common.moe import LAYER_SIZE, MixtureError, build_mixture, check_experts, save_mixture
from finlora.common.preflight import check_model

log = get_logger(__name__)


def train_router(mixture: Any, tokenizer: Any, rows: Sequence[Row], steps: int, batch_size: int, lr: float,
                 max_length: int, seed: int, progress: bool = True) -> list[float]:
    """``steps`` AdamW steps on the router only; returns the loss of every step."""
    return train_router_on(mixture, tokenizer, encode_rows(rows, tokenizer, max_length), steps, batch_size, lr, seed,
                           progress)


def train_router_on(mixture: Any, tokenizer: Any, examples: Sequence[Example], steps: int, batch_size: int,
                    lr: float, seed: int, progress: bool = True) -> list[float]:
    """:func:`train_router` on examples already tokenized (an institution's local data in a federated round)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    params = [p for p in mixture.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batches: list[list[int]] = []
    losses: list[float] = []
    mixture.train()
    with tqdm(total=steps, desc="router", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(steps):
            if not batches:
                batches = length_grouped_batches(examples, batch_size, seed + step)
            batch = collate([examples[i] for i in batches.pop()], tokenizer.pad_token_id)
            loss = mixture(**batch).loss
            if not math.isfinite(float(loss)):
                raise RuntimeError(f"router training: the loss became {float(loss)} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    mixture.eval()
    return losses


def add_moe_parser(sub: Any) -> Any:
    """Register ``finlora moe`` and its ``train`` subcommand; returns the ``moe`` subparsers (``compare`` lives in
    ``eval``, which scores models)."""
    moe = sub.add_parser("moe", help="a mixture of LoRA experts (per-task adapters + a learned router)")
    moe_sub = moe.add_subparsers(dest="moe_command", required=True)
    train = moe_sub.add_parser("train", help="train a router over frozen expert adapters",
                               description="Train an X-LoRA router over frozen per-task adapters on JSONL rows "
                                           "(context/target); writes moe.json + router.safetensors. Evaluate it "
                                           "with 'finlora eval --moe DIR'.")
    train.add_argument("--model", help="base model (default: model.name)")
    train.add_argument("--expert", action="append", default=[], metavar="NAME=DIR", required=True,
                       help="an expert adapter directory (repeat; at least 2)")
    train.add_argument("--data", action="append", default=[], metavar="FILE", required=True,
                       help="JSONL training rows (repeat for several tasks)")
    train.add_argument("--steps", type=int, default=50)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--depth", type=int, default=1, help="router layers (X-LoRA xlora_depth)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_moe_train)
    return moe_sub


def cmd_moe_train(args: argparse.Namespace) -> int:
    from finlora.common.model import load_base_model

    experts: dict[str, Path] = {}
    for pair in args.expert:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path or name in experts:
            raise ConfigError(f"--expert {pair!r}: expected NAME=DIR with a new NAME")
        experts[name] = Path(path)
    try:
        experts = check_experts(experts)
    except MixtureError as exc:
        raise ConfigError(f"--expert: {exc}") from exc
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--depth", args.depth)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    rows: list[Row] = []
    for file in args.data:
        rows += read_jsonl(Path(file).expanduser())  # names the file and line of a malformed row
    if not rows:
        raise DataError(f"--data {', '.join(args.data)}: no rows")
    cfg = load_config({"model.name": args.model} if args.model else {})
    check_model(cfg.model.name, "--model")
    model, tokenizer, effective = load_base_model(cfg.model)
    mixture = build_mixture(model, experts, depth=args.depth)
    trainable = sum(p.numel() for p in mixture.parameters() if p.requires_grad)
    print(f"finlora moe train: {cfg.model.name} ({effective}), {len(experts)} experts [{', '.join(experts)}], "
          f"router {trainable:,} parameters, {len(rows)} rows, {args.steps} steps", flush=True)
    start = time.perf_counter()
    losses = train_router(mixture, tokenizer, rows, args.steps, args.batch_size, args.lr, args.max_length,
                          args.seed, progress=not args.no_progress)
    out = Path(args.out).expanduser()
    save_mixture(mixture, experts, out, args.depth, LAYER_SIZE, None, cfg.model.name,
                 metadata={"steps": args.steps, "rows": len(rows), "first_loss": losses[0], "last_loss": losses[-1]})
    head, tail = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"finlora moe train: loss {head:.4f} (first 5 steps) -> {tail:.4f} (last 5) in "
          f"{time.perf_counter() - start:.0f}s; mixture in {out}", flush=True)
    return 0
