"""Fast mode for closed-label tasks: pick the label whose full token sequence is most likely after the prompt.

Generation costs one forward pass per new token and then has to *parse* free text; a closed task only needs
to know which of its few labels the model prefers. Each prompt batch is run once with the KV cache kept; the
cache is repeated once per label and all labels' tokens are scored together in a second, short pass. The
score of a label is the sum of the log-probabilities of its tokens followed by EOS, i.e. of exactly the answer
sequence the model was trained to produce (``common.data.encode_rows`` tokenizes the answer on its own and
appends EOS), so the ranking has no parsing step and cannot produce an out-of-set answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from finlora.eval.batching import encode_prompts, left_pad, length_order, max_prompt_tokens, run_in_batches


def label_surface_forms(labels: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Each label as the data writes it (the most frequent casing among ``targets``; else as given).

    The registry holds lowercase labels, but a model fine-tuned on ``Yes``/``No`` (FinGPT's Headline answers)
    assigns its likelihood to those exact tokens, so they, not ``yes``/``no``, are the sequences to score.
    """
    counts = Counter(targets)
    forms = []
    for label in labels:
        seen = [(n, t) for t, n in counts.most_common() if t.strip().lower() == label.lower()]
        forms.append(seen[0][1].strip() if seen else label)
    return forms


def label_token_ids(tokenizer: Any, labels: Sequence[str], append_eos: bool = True) -> list[list[int]]:
    """Each label's answer tokens as in training: tokenized alone, no special tokens, EOS appended."""
    ids = tokenizer(list(labels), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    return [list(x) + eos for x in ids]


def label_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str], batch_size: int,
                   on_batch: Callable[[int], None] | None = None) -> tuple[list[list[float]], int, int]:
    """Log-likelihood of every label after every prompt: ``scores[prompt][label]``.

    Returns ``(scores, batch size that worked, prompts cut to fit the context)``.
    """
    import torch

    if not prompts:
        return [], batch_size, 0
    device = next(model.parameters()).device
    label_ids = label_token_ids(tokenizer, labels)
    longest = max(len(x) for x in label_ids)
    ids, cut = encode_prompts(tokenizer, prompts, max_prompt_tokens(model, longest))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_labels = len(labels)
    # labels right-padded to one width: [L, T]; position j of label l is predicted by the logits before it
    lab = torch.full((n_labels, longest), pad, dtype=torch.long)
    lab_mask = torch.zeros((n_labels, longest), dtype=torch.long)
    for i, x in enumerate(label_ids):
        lab[i, :len(x)] = torch.tensor(x)
        lab_mask[i, :len(x)] = 1
    lab, lab_mask = lab.to(device), lab_mask.to(device)
    scores: list[list[float]] = [[] for _ in prompts]

    def run(chunk: list[int]) -> None:
        input_ids, mask, positions = left_pad([ids[i] for i in chunk], pad, device)
        b = len(chunk)
        # only the last position's logits are needed: [B, 1, V] instead of [B, P, V] (GBs for a 128k vocabulary)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        total = first[:, lab[:, 0]]  # [B, L]
        if longest > 1:
            cache_key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5
            cache = out[cache_key]
            cache.batch_repeat_interleave(n_labels)  # row b*L + l continues prompt b with label l
            feed = lab[:, :-1].repeat(b, 1)  # [B*L, T-1]
            feed_mask = torch.cat([mask.repeat_interleave(n_labels, dim=0), lab_mask[:, :-1].repeat(b, 1)], dim=1)
            start = mask.sum(dim=1).repeat_interleave(n_labels).unsqueeze(1)
            feed_pos = start + torch.arange(longest - 1, device=device).unsqueeze(0)
            logits = model(input_ids=feed, attention_mask=feed_mask, position_ids=feed_pos, use_cache=False,
                           **{cache_key: cache}).logits.float()
            logp = torch.log_softmax(logits, dim=-1)  # [B*L, T-1, V]
            target = lab[:, 1:].repeat(b, 1)
            step = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * lab_mask[:, 1:].repeat(b, 1)
            total = total + step.sum(dim=1).view(b, n_labels)
        for row, i in enumerate(chunk):
            scores[i] = [float(v) for v in total[row].cpu()]

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            size = run_in_batches(length_order([len(x) for x in ids]), batch_size, run, on_batch=on_batch)
    finally:
        model.train(was_training)
    return scores, size, cut


def sequence_logprob(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """Log-likelihood of ``answer_ids`` after ``prompt_ids``, one unpadded sequence (the reference computation)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(answer_ids)))


def best_labels(scores: Sequence[Sequence[float]], labels: Sequence[str]) -> list[str]:
    """The highest-scoring label of each prompt (first label on a tie)."""
    return [labels[max(range(len(row)), key=lambda j: (row[j], -j))] for row in scores]
