"""One round of local LoRA training.

Pure PyTorch around a PEFT model: AdamW over the trainable adapter parameters only, a learning rate that
follows a schedule across *rounds* (so federated training anneals like centralised training would),
length-grouped batches, optional FedProx proximal term, gradient clipping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import TrainConfig
from common.data import Example, collate, length_grouped_batches


@dataclass(frozen=True)
class TrainStats:
    """What a round of local training did (reported to the server as metrics)."""

    loss: float
    steps: int
    examples_seen: int
    tokens: int
    answer_tokens: int
    seconds: float
    lr: float


def round_learning_rate(cfg: TrainConfig, server_round: int, num_rounds: int) -> float:
    """Learning rate of a round: constant, or cosine from ``lr`` (round 1) to ``lr * lr_min_ratio`` (last)."""
    if cfg.lr_schedule == "constant" or num_rounds <= 1:
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"train.lr-schedule must be 'constant' or 'cosine', got '{cfg.lr_schedule}'")
    progress = min(max(server_round - 1, 0) / (num_rounds - 1), 1.0)
    floor = cfg.lr * cfg.lr_min_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def planned_batches(examples: Sequence[Example], cfg: TrainConfig, seed: int) -> list[list[int]]:
    """Index batches for this round: ``local_epochs`` full passes, or exactly ``local_steps`` batches."""
    if cfg.local_epochs > 0:
        return [b for epoch in range(cfg.local_epochs)
                for b in length_grouped_batches(examples, cfg.batch_size, seed + epoch)]
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < cfg.local_steps:
        batches += length_grouped_batches(examples, cfg.batch_size, seed + epoch)
        epoch += 1
    return batches[: cfg.local_steps]


def train_round(model: Any, examples: Sequence[Example], cfg: TrainConfig, lr: float, pad_id: int, seed: int,
                proximal_mu: float = 0.0, global_arrays: Mapping[str, np.ndarray] | None = None) -> TrainStats:
    """Train the model's trainable (LoRA) parameters for one round; the caller has loaded the global adapter.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2`` over the trainable parameters, with
    ``global_arrays`` keyed like ``lora_state`` (PEFT names, adapter name stripped).
    """
    import torch

    torch.manual_seed(seed)  # LoRA dropout draws from the global generator: make a round reproducible
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError("the model has no trainable parameters; is the LoRA adapter attached?")
    params = [p for _, p in named]
    anchors = proximal_anchors(named, proximal_mu, global_arrays, device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    batches = planned_batches(examples, cfg, seed)
    model.train()
    start = time.perf_counter()
    loss_sum, answer_tokens, tokens, seen = 0.0, 0, 0, 0
    for batch_ids in batches:
        batch = collate([examples[i] for i in batch_ids], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        n_answer = int((batch["labels"][:, 1:] != -100).sum())
        objective = loss
        if anchors:
            objective = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        loss_sum += loss.item() * n_answer
        answer_tokens += n_answer
        tokens += int(batch["attention_mask"].sum())
        seen += len(batch_ids)
    optimizer.zero_grad(set_to_none=True)
    return TrainStats(loss=loss_sum / max(answer_tokens, 1), steps=len(batches), examples_seen=seen,
                      tokens=tokens, answer_tokens=answer_tokens, seconds=time.perf_counter() - start, lr=lr)


def proximal_anchors(named: Sequence[tuple[str, Any]], proximal_mu: float,
                     global_arrays: Mapping[str, np.ndarray] | None, device: Any) -> list[Any]:
    """The global values of the trainable parameters, which FedProx pulls towards (empty when mu is 0)."""
    import torch

    if proximal_mu <= 0:
        return []
    if global_arrays is None:
        raise ValueError("FedProx needs the global adapter to anchor the proximal term")
    return [torch.as_tensor(global_arrays[_state_key(n)], device=device, dtype=p.dtype) for n, p in named]


def _state_key(param_name: str) -> str:
    """``...lora_A.default.weight`` (parameter) -> ``...lora_A.weight`` (PEFT state-dict key)."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B"):
            del parts[i + 1]
            break
    return ".".join(parts)
