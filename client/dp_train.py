"""One round of DP-SGD local training with Opacus: per-sample clipping and Gaussian noise on LoRA only.

* Only the adapter's parameters require grad, so Opacus's grad-sample hooks attach to the LoRA ``Linear``
  layers alone; the (possibly 4-bit) base model stays frozen and outside per-sample computation.
* Batches are **Poisson-sampled** (each example joins a step with probability q = batch_size / n), the
  sampling that the RDP/PRV accountants assume. Fixed-size or length-grouped batches would void the bound.
* The loss is the mean over examples of each example's mean answer-token loss, so that one example's
  per-sample gradient depends on that example only (HF's batch-wide token mean would couple them).
* The grad-sample hooks are removed after the round, so the cached model is left as it was found.
* The LM head runs on answer positions only (``client.fast_loss``), as in the non-DP loop; batches stay
  padded, one example per row (no packing), so each per-sample gradient is one example's.
* The Gaussian noise and the Poisson sample come from **fresh secret randomness** every round
  (``secrets``/``os.urandom``), never from the round's ``seed``: that seed is ``train.seed + 1000 * round +
  partition-id``, all known to the server, which could otherwise regenerate the noise and subtract it from the
  update (the guarantee would be void), or learn which rows were sampled (amplification by subsampling assumes
  the sample is hidden). Noise uses Opacus's ``secure_mode`` (robust to floating-point attacks). Only a test passes
  ``noise_seed`` to make a DP round reproducible; the data order and LoRA dropout stay seeded by ``seed``.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finlora.client.fast_loss import answer_token_losses, per_row_mean, supports_answer_only_head
from finlora.client.privacy import PrivacyLedger
from finlora.client.train import TrainStats, proximal_anchors
from finlora.common.config import DpConfig, TrainConfig
from finlora.common.data import Example, IGNORE_INDEX, collate


def per_example_loss(logits: Any, labels: Any) -> Any:
    """Each example's mean cross-entropy over its answer tokens (shape ``[batch]``)."""
    import torch.nn.functional as F

    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def private_example_losses(gsm: Any, batch: dict[str, Any], answer_only_head: bool = True) -> Any:
    """:func:`per_example_loss` of a padded batch through the grad-sample module ``gsm`` (shape ``[batch]``).

    With ``answer_only_head`` the LM head runs on answer positions only (``client.fast_loss``); the same
    function, without ``batch x seq x vocab`` logits. Rows stay one example each (never packed): Opacus's
    per-sample gradients are per row, and each must be one example's for the clipping bound to hold.
    """
    if not answer_only_head:
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_loss(logits, batch["labels"])

    token_losses, rows = answer_token_losses(gsm, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return per_row_mean(token_losses, rows, batch["input_ids"].shape[0])


def steps_per_round(n_examples: int, cfg: TrainConfig) -> int:
    """Planned optimizer steps per round: ``local_steps``, or epochs x (n / batch size) expected batches."""
    if cfg.local_epochs > 0:
        return cfg.local_epochs * max(1, math.ceil(n_examples / cfg.batch_size))
    return cfg.local_steps


def sample_rate(n_examples: int, cfg: TrainConfig) -> float:
    return min(1.0, cfg.batch_size / n_examples)


def poisson_batches(n_examples: int, rate: float, steps: int, seed: int | None = None) -> list[list[int]]:
    """``steps`` Poisson-sampled index batches (each example independently with probability ``rate``).

    ``seed=None`` (what training uses) draws from 128 bits of fresh OS entropy, so nobody can recompute the sample.
    """
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    return [np.flatnonzero(rng.random(n_examples) < rate).tolist() for _ in range(steps)]


def noise_generator(device: Any, seed: int | None = None) -> Any:
    """The ``torch.Generator`` of DP-SGD's Gaussian noise on ``device``: seeded from ``os.urandom`` (64 bits)
    unless a test passes ``seed``. Never the global torch RNG, whose seed the server can know."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64) if seed is None else seed)
    return generator


def make_private(model: Any, params: list[Any], lr: float, cfg: TrainConfig, sigma: float, max_grad_norm: float,
                 expected_batch_size: int, grad_sample_mode: str = "hooks", generator: Any = None) -> tuple[Any, Any]:
    """Opacus grad-sample module over ``model`` and a ``DPOptimizer`` around AdamW on ``params``.

    The noise is drawn from ``generator`` (default: a fresh secret one, :func:`noise_generator`) in Opacus's
    ``secure_mode`` (each draw a sum of four Gaussians, against floating-point attacks on the noise).
    """
    import torch
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    if generator is None:
        generator = noise_generator(params[0].device if params else "cpu")
    gsm = wrap_model(model, grad_sample_mode=grad_sample_mode, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay),
                            noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                            expected_batch_size=expected_batch_size, loss_reduction="mean",
                            generator=generator, secure_mode=True)
    return gsm, optimizer


def dp_train_round(model: Any, examples: Sequence[Example], cfg: TrainConfig, dp: DpConfig, ledger: PrivacyLedger,
                   lr: float, pad_id: int, seed: int, proximal_mu: float = 0.0,
                   global_arrays: Mapping[str, np.ndarray] | None = None,
                   noise_seed: int | None = None) -> TrainStats:
    """Train one round with DP-SGD and record its steps in ``ledger`` (the caller has authorized them).

    FedProx's proximal term depends on the weights only, not on any example, so its gradient is added
    *after* Opacus has clipped and noised the data gradient: it costs no privacy and is not clipped.

    ``seed`` (known to the server) seeds only LoRA dropout and other non-private randomness. The noise and the
    Poisson sample come from fresh secret randomness unless ``noise_seed`` is given: tests only, never in
    production (a known noise seed voids the DP guarantee).
    """
    import torch

    torch.manual_seed(seed)  # LoRA dropout only: the noise has its own secret generator (noise_generator)
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchors = proximal_anchors(named, proximal_mu, global_arrays, device)
    answer_only_head = supports_answer_only_head(model)
    rate = sample_rate(len(examples), cfg)
    steps = steps_per_round(len(examples), cfg)
    gsm, optimizer = make_private(model, params, lr, cfg, ledger.noise_multiplier, dp.max_grad_norm,
                                  expected_batch_size=max(1, round(rate * len(examples))),
                                  generator=noise_generator(device, noise_seed))
    sample_seed = None if noise_seed is None else noise_seed + 1
    model.train()
    start = time.perf_counter()
    loss_sum, answer_tokens, tokens, seen = 0.0, 0, 0, 0
    try:
        for batch_ids in poisson_batches(len(examples), rate, steps, sample_seed):
            if not batch_ids:
                continue  # an empty Poisson draw: nothing released, still counted in the ledger (conservative)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], pad_id).items()}
            losses = private_example_losses(gsm, batch, answer_only_head)
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            if optimizer.pre_step():  # clip per sample, add noise, average: p.grad is now private
                for p, anchor in zip(params, anchors):
                    p.grad.add_(p.detach() - anchor, alpha=proximal_mu)
                optimizer.original_optimizer.step()
            n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += float(losses.detach().sum())
            answer_tokens += n_answer
            tokens += int(batch["attention_mask"].sum())
            seen += len(batch_ids)
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm.remove_hooks()
        for p in params:
            p.grad_sample = None
    ledger.record(rate, steps)
    return TrainStats(loss=loss_sum / max(seen, 1), steps=steps, examples_seen=seen, tokens=tokens,
                      answer_tokens=answer_tokens, seconds=time.perf_counter() - start, lr=lr)
