"""Answer-token loss of a (PEFT) causal LM, shared by the server's held-out check and client evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finlora.common.data import IGNORE_INDEX, Example, iterate_batches


def answer_loss(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Mean cross-entropy over answer tokens (prompt masked), and the number of those tokens.

    Summed over tokens and divided once, so the result does not depend on how examples fall into batches.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in iterate_batches(examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count
