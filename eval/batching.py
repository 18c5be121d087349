"""Batching for inference: prompt encoding, length-sorted order, left padding, and batch halving on OOM.

Evaluation time is dominated by padding and by how many prompts fit in one pass. Sorting prompts by length
(longest first) makes batches nearly pad-free and meets any out-of-memory error on the very first batch;
left padding keeps every prompt's last token in the last column, where generation and label scoring read
their logits. The batch size starts where the caller asks and halves whenever a batch does not fit, then
stays there: a 70 GB model and the tiny CPU model use the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from finlora.common.logs import get_logger

log = get_logger(__name__)


def encode_prompts(tokenizer: Any, prompts: Sequence[str],
                   max_prompt_tokens: int | None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (as in training: ``add_special_tokens=True``), cut from the left to fit.

    Returns the ids and how many prompts were cut. Cutting from the left keeps the question and the
    ``Answer:`` cue, which sit at the end of every FinLoRA prompt; it only happens when a prompt plus the
    answer budget exceeds the model's context (the long XBRL prompts on a small model).
    """
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if not max_prompt_tokens:
        return [list(x) for x in ids], 0
    cut = sum(1 for x in ids if len(x) > max_prompt_tokens)
    return [list(x[-max_prompt_tokens:]) for x in ids], cut


def max_prompt_tokens(model: Any, max_new_tokens: int) -> int | None:
    """Room left for the prompt in the model's context window, or ``None`` if the model states no limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(1, int(limit) - max_new_tokens) if limit else None


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted longest first (stable, so equal lengths keep file order)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (CUDA, MPS or XPU), which a smaller batch may avoid."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run_in_batches(order: Sequence[int], batch_size: int, run: Callable[[list[int]], None],
                   oom: Callable[[BaseException], bool] = is_oom, on_batch: Callable[[int], None] | None = None) -> int:
    """Call ``run`` on consecutive chunks of ``order``; on OOM halve the batch and retry the same chunk.

    Returns the batch size that worked last (callers can start the next task there). A batch of one that
    still does not fit re-raises the error.
    """
    size = max(1, int(batch_size))
    start = 0
    while start < len(order):
        chunk = list(order[start:start + size])
        try:
            run(chunk)
        except Exception as exc:
            if not oom(exc) or size == 1:
                raise
            size //= 2
            _free_accelerator_memory()
            log.warning("out of memory with batch %d; continuing with batch %d", len(chunk), size)
            continue
        start += len(chunk)
        if on_batch is not None:
            on_batch(len(chunk))
    return size


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) with left padding; positions count real tokens only."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
