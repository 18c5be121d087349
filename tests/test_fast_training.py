"""finlora's fast training path (issue #7) computes HF's loss and gradients: answer-only head, packing, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finlora.client.dp_train import make_private, per_example_loss, private_example_losses
from finlora.client.fast_loss import answer_token_losses, body_and_head, chunked_cross_entropy, per_row_mean
from finlora.client.local_data import local_data
from finlora.client.packing import collate_packed, first_fit_decreasing, forward_groups, token_budget_batches
from finlora.client.train import StepPlan, planned_batches, train_round, train_step
from finlora.common.adapter import load_lora_state, lora_state
from finlora.common.config import load_config
from finlora.common.data import IGNORE_INDEX, collate
from finlora.common.evaluation import answer_loss
from finlora.common.model import get_model_bundle


@pytest.fixture()
def tiny():
    cfg = load_config({"lora.dropout": 0.0})  # no dropout: both paths see the same function
    bundle = get_model_bundle(cfg.model, cfg.lora)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in lora_state(bundle.model).items()}
    load_lora_state(bundle.model, arrays)  # non-zero B: every LoRA parameter gets a gradient
    data = local_data(cfg.data, ("", 0, 2), bundle.tokenizer)
    return cfg, bundle, data, arrays


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step_grads(model, examples, plan, pad_id):
    params = _params(model)
    for p in params:
        p.grad = None
    loss, n_answer = train_step(model, examples, range(len(examples)), pad_id, plan, torch.device("cpu"))
    return loss, n_answer, [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("plan", [StepPlan(), StepPlan(packing=True, row_capacity=160),
                                  StepPlan(max_tokens_per_forward=150),
                                  StepPlan(packing=True, row_capacity=120, max_tokens_per_forward=240)],
                         ids=["padded", "packed", "split-forward", "packed-split-forward"])
def test_fast_step_has_hf_loss_and_gradients(tiny, plan):
    _cfg, bundle, data, _ = tiny
    pad = bundle.tokenizer.pad_token_id
    batch = data.train[:8]
    ref_loss, ref_n, ref_grads = _step_grads(bundle.model, batch, StepPlan(answer_only_head=False), pad)
    loss, n_answer, grads = _step_grads(bundle.model, batch, plan, pad)
    collated = collate(batch, pad)
    with torch.no_grad():
        assert abs(ref_loss - float(bundle.model(**collated).loss)) < 1e-6  # the reference is HF's loss
    assert n_answer == ref_n == int((collated["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(loss - ref_loss) < 1e-5
    assert all(g.abs().sum() > 0 for g in ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_packed_example_sees_only_itself(tiny):
    _cfg, bundle, data, _ = tiny
    pad = bundle.tokenizer.pad_token_id
    examples = data.train[:5]
    body, head = body_and_head(bundle.model)
    rows = [[0, 1, 2], [3, 4]]
    packed = collate_packed(examples, rows, pad)
    assert "attention_mask" not in packed
    with torch.no_grad():
        hidden = body(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                      use_cache=False).last_hidden_state  # a cache would turn the packed-mask detection off
        packed_logits = head(hidden)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(examples[i].input_ids)
                alone = bundle.model(input_ids=torch.tensor([examples[i].input_ids])).logits[0]
                torch.testing.assert_close(packed_logits[r, start:start + n], alone, rtol=1e-4, atol=1e-5)
                assert packed["labels"][r, start] == IGNORE_INDEX  # nothing predicts an example's first token
                start += n
    assert (packed["input_ids"][1, start:] == pad).all() and start < packed["input_ids"].shape[1]  # a padded tail


def test_chunked_cross_entropy_matches_one_piece():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (g_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked = chunked_cross_entropy(head, hidden, targets, chunk=8)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)


def test_dp_answer_only_losses_and_per_sample_gradients_equal_full_logits_path(tiny):
    cfg, bundle, data, _ = tiny
    batch = collate(data.train[:6], bundle.tokenizer.pad_token_id)
    params = _params(bundle.model)

    def per_sample(answer_only):
        gsm, opt = make_private(bundle.model, params, 0.01, cfg.train, sigma=0.0, max_grad_norm=1e9,
                                expected_batch_size=6)
        try:
            losses = private_example_losses(gsm, batch, answer_only)
            losses.mean().backward()
            return losses.detach(), [p.grad_sample.detach().clone() for p in params]
        finally:
            opt.zero_grad(set_to_none=True)
            gsm.remove_hooks()
            for p in params:
                p.grad_sample = None

    ref_losses, ref_samples = per_sample(False)
    losses, samples = per_sample(True)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for s, r in zip(samples, ref_samples):
        assert s.shape[0] == 6
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-6)


def test_per_row_mean_equals_per_example_loss(tiny):
    _cfg, bundle, data, _ = tiny
    batch = collate(data.train[:4], bundle.tokenizer.pad_token_id)
    with torch.no_grad():
        token_losses, rows = answer_token_losses(bundle.model, batch["input_ids"], batch["labels"],
                                                 batch["attention_mask"])
        logits = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(per_row_mean(token_losses, rows, 4), per_example_loss(logits, batch["labels"]))


def test_token_budget_batches_cover_an_epoch_within_budget(tiny):
    _cfg, _bundle, data, _ = tiny
    examples = data.train
    lengths = [len(e.input_ids) for e in examples]
    for packed in (False, True):
        batches = token_budget_batches(examples, 400, seed=3, packed=packed)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert cost <= 400 or len(b) == 1
    assert token_budget_batches(examples, 400, seed=3) == token_budget_batches(examples, 400, seed=3)


def test_packing_and_forward_groups_keep_every_example_once():
    lengths = [50, 20, 70, 30, 10, 90, 40]
    bins = first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins) and len(bins) == 4
    for packed in (False, True):
        passes = forward_groups(lengths, 200, packed, 100)
        assert sorted(i for rows in passes for row in rows for i in row) == list(range(7))
        assert all(len(rows) * max(sum(lengths[i] for i in row) for row in rows) <= 200 or len(rows) == 1
                   for rows in passes)
    assert forward_groups(lengths, 0, False, 100) == [[[i] for i in range(7)]]


def test_round_with_token_budget_and_packing_trains(tiny):
    cfg, bundle, data, arrays = tiny
    pad = bundle.tokenizer.pad_token_id
    before, _ = answer_loss(bundle.model, data.val, 16, pad)
    stats = train_round(bundle.model, data.train, cfg.train, cfg.train.lr, pad, seed=0, max_tokens_per_step=480,
                        packing=True, max_tokens_per_forward=256)
    after, _ = answer_loss(bundle.model, data.val, 16, pad)
    assert stats.steps == cfg.train.local_steps and after < before
    assert stats.tokens <= 480 * stats.steps
    plan = planned_batches(data.train, cfg.train, 0, 480, True)
    assert stats.examples_seen == sum(len(b) for b in plan)
    load_lora_state(bundle.model, arrays)


def test_round_reads_the_optional_config_keys(tiny):
    """``train.max-tokens-per-step`` / ``packing`` / ``max-tokens-per-forward`` given as config or as kwargs
    train identically."""
    import dataclasses

    cfg, bundle, data, arrays = tiny
    pad = bundle.tokenizer.pad_token_id
    keys = dict(max_tokens_per_step=480, packing=True, max_tokens_per_forward=256)
    with_keys = dataclasses.replace(cfg.train, **keys)
    by_kwargs = train_round(bundle.model, data.train, cfg.train, cfg.train.lr, pad, seed=1, **keys)
    after_kwargs = lora_state(bundle.model)
    load_lora_state(bundle.model, arrays)
    by_config = train_round(bundle.model, data.train, with_keys, cfg.train.lr, pad, seed=1)
    after_config = lora_state(bundle.model)
    load_lora_state(bundle.model, arrays)
    assert (by_kwargs.examples_seen, by_kwargs.tokens) == (by_config.examples_seen, by_config.tokens)
    assert all(np.array_equal(after_kwargs[k], after_config[k]) for k in after_kwargs)
