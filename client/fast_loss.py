"""Answer-only causal-LM loss: the LM head runs on the answer positions only, never on the whole sequence.

HF's ``model(**batch).loss`` applies the LM head to every position (``batch x seq x vocab`` logits, upcast to
fp32 for the loss) although the prompt is masked out. For a Llama-3 vocabulary of 128,256 that tensor is
the largest activation of a QLoRA step. Here the decoder body runs as usual, the hidden states of the positions
whose *next* token is an answer token are gathered (``N x hidden``), and the head plus cross-entropy run on
those rows only, in chunks whose logits are recomputed in the backward pass when there are many of them.
The result is the same function as HF's loss: per-token cross-entropy of ``logits[t]`` against ``labels[t+1]``.

* :func:`answer_token_losses` returns each answer token's loss and the row it came from, so callers reduce it
  the way they need: the token mean (HF's objective, :func:`token_mean_loss`) or the per-example mean that
  DP-SGD needs (:func:`per_row_mean`).
* Packed rows (several examples per row) work the same way: the caller passes ``position_ids`` that restart at
  every example and no attention mask, and transformers builds the block-diagonal causal mask from them.
"""

from __future__ import annotations

from typing import Any

from finlora.common.data import IGNORE_INDEX

HEAD_CHUNK = 4096
"""Answer positions per LM-head chunk; above it each chunk's logits are recomputed in backward, not stored."""

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention implementations for which transformers derives the per-example mask from restarting position ids."""


def body_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder body (``LlamaModel``) and LM head of a causal LM, through PEFT and Opacus wrappers.

    Not for a mixture of experts (PEFT's X-LoRA): it computes its experts' weights inside the model's own forward,
    which running the body directly would skip (the router would get no gradient)."""
    from peft.tuners.xlora.model import XLoraModel

    inner = model
    while True:
        if hasattr(inner, "_module"):  # Opacus GradSampleModule
            inner = inner._module
        elif hasattr(inner, "get_base_model"):  # PEFT PeftModel
            if isinstance(getattr(inner, "base_model", None), XLoraModel):
                raise NotImplementedError("X-LoRA weighs its experts in the model's forward; use the HF loss path")
            inner = inner.get_base_model()
        else:
            break
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise NotImplementedError(f"{type(inner).__name__} transforms its logits; use the HF loss path")
    return inner.get_decoder(), inner.get_output_embeddings()


def supports_answer_only_head(model: Any) -> bool:
    """Whether :func:`body_and_head` can split this model (a plain decoder + linear head, as Llama)."""
    try:
        body, head = body_and_head(model)
    except (AttributeError, NotImplementedError):
        return False
    return body is not None and head is not None


def chunked_cross_entropy(head: Any, hidden: Any, targets: Any, chunk: int = HEAD_CHUNK) -> Any:
    """``cross_entropy(head(hidden).float(), targets)`` per row, chunk by chunk (``hidden``: ``N x H``).

    With more than ``chunk`` rows, each chunk is checkpointed: its ``chunk x vocab`` logits exist only while
    that chunk's loss (or gradient) is computed, so long answers never hold ``N x vocab`` logits at once.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(h: Any, t: Any) -> Any:
        return F.cross_entropy(head(h).float(), t, reduction="none")

    if hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    return torch.cat([checkpoint(piece, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


def answer_token_losses(model: Any, input_ids: Any, labels: Any, attention_mask: Any = None,
                        position_ids: Any = None, chunk: int = HEAD_CHUNK) -> tuple[Any, Any]:
    """Cross-entropy of every answer token and the batch row it belongs to (both shape ``[N]``).

    Position ``t`` predicts ``labels[:, t + 1]``; only positions whose next label is not ``IGNORE_INDEX`` reach
    the LM head. Packed rows must label each example's first token ``IGNORE_INDEX`` (see ``client.packing``).
    """
    body, head = body_and_head(model)
    if position_ids is not None and attention_mask is None:
        implementation = getattr(body.config, "_attn_implementation", None)
        if implementation not in PACKING_ATTENTION:
            raise NotImplementedError(f"attention '{implementation}' does not separate packed examples; "
                                      f"use one of {PACKING_ATTENTION} or unpacked batches")
    # use_cache=False matters for packing too: with a cache, transformers skips the packed-sequence mask
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = labels[rows, cols + 1]
    return chunked_cross_entropy(head, hidden[rows, cols], targets, chunk), rows


def per_row_mean(token_losses: Any, rows: Any, n_rows: int) -> Any:
    """Each row's mean over its answer tokens (rows without answer tokens get 0), shape ``[n_rows]``."""
    import torch

    sums = torch.zeros(n_rows, dtype=token_losses.dtype, device=token_losses.device).index_add(0, rows,
                                                                                               token_losses)
    counts = torch.bincount(rows, minlength=n_rows).clamp(min=1)
    return sums / counts
