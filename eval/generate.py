"""Greedy KV-cache generation of answers, batched by length with left padding.

Used for every task in FinLoRA mode and for the open-answer tasks in fast mode. FinLoRA mode keeps
FinLoRA's stopping rule (EOS or the token budget, ``test/inference.py``) so its raw outputs are what the
reference produces; fast mode also stops a row at the first newline after the answer has started, since every
FinLoRA answer is one line and the tokens after it are never scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from finlora.eval.batching import encode_prompts, left_pad, length_order, max_prompt_tokens, run_in_batches

LINE_TOKEN_CACHE: dict[tuple[str, int], tuple[frozenset[int], frozenset[int]]] = {}
"""Explicit per-process cache: (tokenizer name, vocab size) -> (ids whose text holds a newline, blank ids)."""


def line_tokens(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """Token ids that contain a newline, and ids that are whitespace only (decoded one by one, once)."""
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in LINE_TOKEN_CACHE:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        newline = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        blank = frozenset(i for i, t in enumerate(texts) if t.strip() == "")
        LINE_TOKEN_CACHE[key] = (newline, blank)
    return LINE_TOKEN_CACHE[key]


def _newline_stop(tokenizer: Any, prompt_width: int) -> Any:
    """A ``StoppingCriteria`` that ends a row at a newline once the row has produced a non-blank token."""
    import torch
    from transformers import StoppingCriteria

    newline, blank = line_tokens(tokenizer)
    newline_t = torch.tensor(sorted(newline) or [-1])
    blank_t = torch.tensor(sorted(blank) or [-1])

    class NewlineAfterAnswer(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, prompt_width:]
            last = new[:, -1]
            is_newline = torch.isin(last, newline_t.to(last.device))
            # a row has started its answer once some earlier generated token was neither blank nor a newline
            earlier = new[:, :-1]
            started = (~torch.isin(earlier, blank_t.to(earlier.device))).any(dim=1) if earlier.numel() else \
                torch.zeros_like(is_newline)
            return is_newline & started

    return NewlineAfterAnswer()


def first_line(text: str) -> str:
    """The answer's first non-empty line, stripped (what fast mode keeps of a generation)."""
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                   stop_on_newline: bool, sort_by_length: bool = True,
                   on_batch: Callable[[int], None] | None = None) -> tuple[list[str], int, int]:
    """Greedy continuations of ``prompts`` (new tokens only, special tokens dropped), in input order.

    Returns ``(texts, batch size that worked, prompts cut to fit the context)``.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    if not prompts:
        return [], batch_size, 0
    device = next(model.parameters()).device
    ids, cut = encode_prompts(tokenizer, prompts, max_prompt_tokens(model, max_new_tokens))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=pad, use_cache=True)
    order = length_order([len(x) for x in ids]) if sort_by_length else list(range(len(ids)))
    texts: list[str] = [""] * len(prompts)

    def run(chunk: list[int]) -> None:
        input_ids, mask, _ = left_pad([ids[i] for i in chunk], pad, device)
        stops = StoppingCriteriaList([_newline_stop(tokenizer, input_ids.shape[1])]) if stop_on_newline else None
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=stops)
        decoded = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, decoded):
            texts[i] = text

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            size = run_in_batches(order, batch_size, run, on_batch=on_batch)
    finally:
        model.train(was_training)
    return texts, size, cut
