"""Packing several short examples into one row, and token-budget batches.

A packed row holds whole examples back to back; ``position_ids`` restart at 0 for every example and the tail
padding forms a segment of its own. Passed with *no* attention mask, transformers (5.x ``masking_utils``)
detects the packed format from the position ids and builds a block-diagonal causal mask (sdpa, eager, flex) or
uses the varlen kernels (flash attention), so no token attends across examples. Each example's first label is
``IGNORE_INDEX``: the previous example's last token must not be trained to predict it (HF's padded path never
predicts a row's first token either), so a packed batch has exactly the padded batch's answer targets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from finlora.common.data import IGNORE_INDEX, Example


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most ``capacity`` (longer-than-capacity items get their own bin)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate_packed(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Tensors ``input_ids``, ``labels``, ``position_ids`` (no ``attention_mask``) for packed ``rows``.

    ``rows`` lists, per row, the indices into ``examples`` it holds, in order.
    """
    import torch

    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(examples[i].input_ids)
            ids[r, start:start + n] = torch.tensor(examples[i].input_ids)
            labels[r, start + 1:start + n] = torch.tensor(examples[i].labels[1:])
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding is a segment of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def token_budget_batches(examples: Sequence[Example], max_tokens: int, seed: int, packed: bool = False,
                         megabatch_factor: int = 16) -> list[list[int]]:
    """Index batches that each hold at most ``max_tokens`` tokens, in random order; one epoch.

    Unpacked, a batch costs ``size x its longest example`` (the padded width), so examples are length-grouped
    as in ``length_grouped_batches``: shuffled, sorted within mega-batches, cut, batches shuffled. Packed, a
    batch costs the sum of its lengths, so examples stay in random order. A longer-than-budget example still
    forms a batch of one.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    lengths = [len(e.input_ids) for e in examples]
    if not packed:
        per_batch = max(1, max_tokens // max(1, max(lengths, default=1)))
        mega = per_batch * megabatch_factor
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: lengths[j], reverse=True)]
    batches: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i in order:
        cost = (sum(lengths[j] for j in current) + lengths[i] if packed
                else (len(current) + 1) * max(widest, lengths[i]))
        if current and cost > max_tokens:
            batches.append(current)
            current, widest = [], 0
        current.append(i)
        widest = max(widest, lengths[i])
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def forward_groups(lengths: Sequence[int], max_tokens: int, packed: bool, row_capacity: int) -> list[list[list[int]]]:
    """Split one step's examples (positions ``0..n-1`` with ``lengths``) into forward passes of rows.

    Returns passes, each a list of rows, each a list of example positions. Unpacked: one example per row,
    sorted by length, a pass holding at most ``max_tokens`` padded tokens (0: one pass). Packed: rows from
    first-fit-decreasing into ``row_capacity`` tokens, a pass holding at most ``max_tokens // width`` rows.
    """
    if packed:
        rows = first_fit_decreasing(lengths, row_capacity)
    elif max_tokens <= 0:
        return [[[i] for i in range(len(lengths))]]  # the batch as given: the same rows as ``collate``
    else:
        rows = [[i] for i in sorted(range(len(lengths)), key=lambda j: -lengths[j])]
    if max_tokens <= 0:
        return [rows]
    passes: list[list[list[int]]] = []
    current: list[list[int]] = []
    widest = 0
    for row in rows:
        width = sum(lengths[i] for i in row)
        if current and (len(current) + 1) * max(widest, width) > max_tokens:
            passes.append(current)
            current, widest = [], 0
        current.append(row)
        widest = max(widest, width)
    passes.append(current)
    return passes
