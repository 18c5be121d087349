"""FinLoRA's own inference loop, kept verbatim in behaviour as the yardstick for ``finlora`` mode.

FinLoRA HEAD ``test/test_dataset.py::test_fin_tasks`` + ``test/inference.py::inference``: prompts in file order
in fixed batches, ``tokenizer(batch, padding=True)`` with left padding, ``model.generate`` for the task's max
new tokens, decode the *whole* sequence and keep the text after the last ``Answer:``. (FinLoRA passes a
temperature; here decoding is greedy, which is what its near-zero temperature approximates.) The benchmark
times it; a test checks that :mod:`eval.generate` in ``finlora`` mode reproduces its answers exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finlora.eval.scoring import finlora_answer

FINLORA_BATCH = 8
"""FinLoRA's ``--batch_size`` default in ``test/test.py``."""


def finlora_reference_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                              batch_size: int = FINLORA_BATCH) -> list[str]:
    """Answers exactly as FinLoRA's loop extracts them, in input order."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                tokens = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                                   return_token_type_ids=False).to(device)
                res = model.generate(**tokens, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, do_sample=False)
                answers += [finlora_answer(tokenizer.decode(x, skip_special_tokens=True)) for x in res]
    finally:
        tokenizer.padding_side = side
    return answers
