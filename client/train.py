"""One round of local LoRA training.

Pure PyTorch around a PEFT model: AdamW over the trainable adapter parameters only, a learning rate that
follows a schedule across *rounds* (so federated training anneals like centralised training would),
length-grouped batches, optional FedProx proximal term, gradient clipping.

The step itself is finlora's fast path (issue #7): the LM head runs on answer positions only
(``client.fast_loss``), examples can be packed several per row (``client.packing``), batches can be cut by a
token budget instead of a fixed size, a step can be split into smaller forward passes with the same gradient,
and on CUDA the step runs under bf16 autocast. Loss and gradients equal HF's ``model(**batch).loss`` path
(``tests/test_fast_training.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finlora.client.fast_loss import answer_token_losses, supports_answer_only_head
from finlora.client.packing import collate_packed, forward_groups, token_budget_batches
from finlora.common.config import TrainConfig
from finlora.common.data import IGNORE_INDEX, Example, collate, length_grouped_batches


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


def planned_batches(examples: Sequence[Example], cfg: TrainConfig, seed: int, max_tokens_per_step: int = 0,
                    packing: bool = False) -> list[list[int]]:
    """Index batches for this round: ``local_epochs`` full passes, or exactly ``local_steps`` batches.

    A batch holds ``batch_size`` length-grouped examples, or, with ``max_tokens_per_step > 0``, as many as fit
    that many tokens (padded tokens; with ``packing``, real tokens) -- see ``client.packing``.
    """
    def epoch_batches(epoch: int) -> list[list[int]]:
        if max_tokens_per_step > 0:
            return token_budget_batches(examples, max_tokens_per_step, seed + epoch, packed=packing)
        return length_grouped_batches(examples, cfg.batch_size, seed + epoch)

    if cfg.local_epochs > 0:
        return [b for epoch in range(cfg.local_epochs) for b in epoch_batches(epoch)]
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < cfg.local_steps:
        batches += epoch_batches(epoch)
        epoch += 1
    return batches[: cfg.local_steps]


@dataclass(frozen=True)
class StepPlan:
    """How finlora's loop runs a step (see :func:`train_step`).

    Attributes
    ----------
    packing : bool
        Pack several examples per row (position ids restart per example, block-diagonal attention).
    max_tokens_per_forward : int
        Split a step into forward/backward passes of at most this many tokens (0: one pass); the gradient
        is the same, since each pass's loss is divided by the whole step's answer-token count.
    row_capacity : int
        Tokens per packed row (at least the longest example).
    answer_only_head : bool
        LM head on answer positions only (``client.fast_loss``); False: HF's ``model(**batch).loss``.
    bf16 : bool
        Run the step under CUDA bf16 autocast (LoRA matmuls in bf16, fp32 master weights); chosen when the
        model is on CUDA with bf16 or quantized weights (as ``common.model`` loads it there).
    """

    packing: bool = False
    max_tokens_per_forward: int = 0
    row_capacity: int = 0
    answer_only_head: bool = True
    bf16: bool = False


def shifted_answer_tokens(example: Example) -> int:
    """Answer tokens that are predicted (all but a label on the first position, which nothing predicts)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def train_step(model: Any, examples: Sequence[Example], batch_ids: Sequence[int], pad_id: int, plan: StepPlan,
               device: Any) -> tuple[float, int]:
    """Forward and backward of one step's data loss (HF's token mean); returns ``(loss, answer tokens)``.

    Gradients accumulate into ``.grad``; the caller zeroes them before and steps after.
    """
    batch = [examples[i] for i in batch_ids]
    n_answer = sum(shifted_answer_tokens(e) for e in batch)
    if not plan.answer_only_head:
        collated = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        with compute_context(device, plan.bf16):
            loss = model(**collated).loss
        loss.backward()
        return float(loss.detach()), n_answer
    lengths = [len(e.input_ids) for e in batch]
    capacity = max(plan.row_capacity, max(lengths))
    total = 0.0
    for rows in forward_groups(lengths, plan.max_tokens_per_forward, plan.packing, capacity):
        if plan.packing:
            part = collate_packed(batch, rows, pad_id)
        else:
            part = collate([batch[row[0]] for row in rows], pad_id)
        part = {k: v.to(device) for k, v in part.items()}
        with compute_context(device, plan.bf16):
            losses, _rows = answer_token_losses(model, part["input_ids"], part["labels"],
                                                part.get("attention_mask"), part.get("position_ids"))
            loss_sum = losses.sum()
        (loss_sum / max(n_answer, 1)).backward()
        total += float(loss_sum.detach())
    return total / max(n_answer, 1), n_answer


def compute_context(device: Any, bf16: bool) -> Any:
    """CUDA bf16 autocast when asked for (and on CUDA), else a no-op context."""
    import contextlib

    import torch

    if bf16 and getattr(device, "type", str(device)) == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_plan(model: Any, examples: Sequence[Example], cfg: TrainConfig, packing: bool | None,
                 max_tokens_per_forward: int | None) -> StepPlan:
    """The step plan from explicit arguments, else the ``train.*`` config keys.

    bf16 autocast is on for a CUDA model that holds bf16 weights or is quantized (4/8-bit compute in bf16).
    """
    import torch

    packing = cfg.packing if packing is None else packing
    per_forward = cfg.max_tokens_per_forward if max_tokens_per_forward is None else max_tokens_per_forward
    fast = supports_answer_only_head(model)
    device = next(model.parameters()).device
    quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    bf16 = device.type == "cuda" and (quantized or any(p.dtype == torch.bfloat16 for p in model.parameters()))
    return StepPlan(packing=packing and fast, max_tokens_per_forward=per_forward if fast else 0,
                    row_capacity=max((len(e.input_ids) for e in examples), default=0), answer_only_head=fast,
                    bf16=bf16)


def train_round(model: Any, examples: Sequence[Example], cfg: TrainConfig, lr: float, pad_id: int, seed: int,
                proximal_mu: float = 0.0, global_arrays: Mapping[str, np.ndarray] | None = None, *,
                max_tokens_per_step: int | None = None, packing: bool | None = None,
                max_tokens_per_forward: int | None = None) -> TrainStats:
    """Train the model's trainable (LoRA) parameters for one round; the caller has loaded the global adapter.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_global||^2`` over the trainable parameters, with
    ``global_arrays`` keyed like ``lora_state`` (PEFT names, adapter name stripped).

    The loss is HF's (mean cross-entropy over the batch's answer tokens), computed with the LM head on the
    answer positions only. ``max_tokens_per_step``, ``packing`` and ``max_tokens_per_forward`` default to the
    ``train.*`` config keys of those names (0 / False / 0: fixed ``batch_size``, padded length-grouped batches,
    one forward pass per step).
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
    plan = default_plan(model, examples, cfg, packing, max_tokens_per_forward)
    budget = cfg.max_tokens_per_step if max_tokens_per_step is None else max_tokens_per_step
    batches = planned_batches(examples, cfg, seed, budget, plan.packing)
    model.train()
    start = time.perf_counter()
    loss_sum, answer_tokens, tokens, seen = 0.0, 0, 0, 0
    for batch_ids in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, n_answer = train_step(model, examples, batch_ids, pad_id, plan, device)
        if anchors:
            (0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))).backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        loss_sum += loss * n_answer
        answer_tokens += n_answer
        tokens += sum(len(examples[i].input_ids) for i in batch_ids)
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
