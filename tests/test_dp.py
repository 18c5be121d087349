"""DP-SGD (Opacus) on the tiny model: clipping, equivalence with plain SGD, accounting, calibration, budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finlora.client.dp_setup import ledger_store, open_ledger, own_budget
from finlora.client.dp_train import make_private, per_example_loss, poisson_batches
from finlora.client.privacy_engine import InstitutionPrivacyEngine
from finlora.client.local_data import local_data
from finlora.client.privacy import (CALIBRATION_CACHE, ContextLedgerStore, FileLedgerStore, PrivacyBudgetExhausted,
                                    PrivacyLedger, calibrate_noise)
from finlora.common.adapter import load_lora_state, lora_state
from finlora.common.config import load_config
from finlora.common.data import collate
from finlora.common.dp_accounting import epsilon_of
from finlora.common.io import read_jsonl_records
from finlora.common.model import get_model_bundle


@pytest.fixture()
def tiny():
    cfg = load_config({"dp.enabled": True, "lora.dropout": 0.0})  # no dropout: DP and plain paths comparable
    bundle = get_model_bundle(cfg.model, cfg.lora)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in lora_state(bundle.model).items()}
    load_lora_state(bundle.model, arrays)
    data = local_data(cfg.data, ("", 0, 3), bundle.tokenizer)
    batch = collate(data.train[:6], bundle.tokenizer.pad_token_id)
    return cfg, bundle, data, batch, arrays


def _lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_per_sample_gradients_are_clipped_to_the_bound(tiny):
    cfg, bundle, _data, batch, _ = tiny
    params = _lora_params(bundle.model)
    bound = 1e-3
    gsm, opt = make_private(bundle.model, params, 0.01, cfg.train, sigma=0.0, max_grad_norm=bound,
                            expected_batch_size=6)
    try:
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"]).mean().backward()
        samples = [p.grad_sample.detach().clone() for p in params]
        norms = torch.stack([g.reshape(6, -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
        assert (norms > bound).all()  # clipping really has work to do
        opt.clip_and_accumulate()
        factors = (bound / (norms + 1e-6)).clamp(max=1.0)
        clipped = [g * factors.view(-1, *[1] * (g.dim() - 1)) for g in samples]
        clipped_norms = torch.stack([g.reshape(6, -1).norm(dim=1) for g in clipped], dim=1).norm(dim=1)
        assert (clipped_norms <= bound * (1 + 1e-5)).all()
        for p, c in zip(params, clipped):
            torch.testing.assert_close(p.summed_grad, c.sum(dim=0), rtol=1e-5, atol=1e-9)
    finally:
        opt.zero_grad(set_to_none=True)
        gsm.remove_hooks()


def test_dp_step_without_noise_or_clipping_equals_plain_step(tiny):
    """The dp-notes regression test: silent corruption of LoRA updates (opacus#820) fails it."""
    cfg, bundle, _data, batch, arrays = tiny
    params = _lora_params(bundle.model)

    gsm, opt = make_private(bundle.model, params, 0.01, cfg.train, sigma=0.0, max_grad_norm=1e9,
                            expected_batch_size=6)
    try:
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"]).mean().backward()
        per_sample = [p.grad_sample.detach().clone() for p in params]
        opt.step()
        dp_after = lora_state(bundle.model)
    finally:
        opt.zero_grad(set_to_none=True)
        gsm.remove_hooks()

    load_lora_state(bundle.model, arrays)
    plain = torch.optim.AdamW(params, lr=0.01, weight_decay=cfg.train.weight_decay)
    logits = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"]).mean().backward()
    plain.step()
    plain_after = lora_state(bundle.model)
    moved = max(float(np.abs(plain_after[k] - arrays[k]).max()) for k in arrays)
    assert moved > 1e-3
    for k in arrays:
        np.testing.assert_allclose(dp_after[k], plain_after[k], atol=1e-6)

    # per-sample gradients equal gradients computed one example at a time (at the same weights)
    load_lora_state(bundle.model, arrays)
    for i in range(6):
        bundle.model.zero_grad(set_to_none=True)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        out = bundle.model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
        per_example_loss(out, one["labels"]).sum().backward()
        for p, g in zip(params, per_sample):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6)
    bundle.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_sigma_reaches_target_epsilon(accountant):
    q, steps, delta = 8 / 170, 48, 1 / 1700
    for target in (1.0, 8.0):
        sigma = calibrate_noise(target, delta, q, steps, accountant)
        got = epsilon_of([(sigma, q, steps)], delta, accountant)
        assert abs(got - target) / target < 0.02 and got <= target * 1.0001


def test_a_calibration_is_cached_and_a_cached_sigma_below_the_target_is_recalibrated(tmp_path):
    """The cache saves the search, never the check: a cached sigma is used only when its epsilon is what the
    search could have returned; a lowered one (more epsilon than the target: a tampered file) is searched again."""
    q, steps, delta = 8 / 170, 48, 1 / 1700
    sigma = calibrate_noise(8.0, delta, q, steps, "rdp", cache_dir=tmp_path)
    cache = tmp_path / CALIBRATION_CACHE
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [sigma]
    key = next(iter(entries))
    cache.write_text(json.dumps({key: sigma * 1.0005}))  # a little more noise: still a valid answer, so it is used
    assert calibrate_noise(8.0, delta, q, steps, "rdp", cache_dir=tmp_path) == sigma * 1.0005
    cache.write_text(json.dumps({key: sigma * 0.5}))  # half the noise: epsilon far above 8
    assert epsilon_of([(sigma * 0.5, q, steps)], delta, "rdp") > 8.0
    assert calibrate_noise(8.0, delta, q, steps, "rdp", cache_dir=tmp_path) == sigma
    assert json.loads(cache.read_text()) == {key: sigma}
    assert calibrate_noise(1.0, delta, q, steps, "rdp", cache_dir=tmp_path) > sigma  # another target, its own entry
    assert len(json.loads(cache.read_text())) == 2


def test_ledger_survives_restart_and_refuses_beyond_budget(tmp_path):
    data = tmp_path / "bank-a.jsonl"
    data.write_text("")
    dp = load_config({"dp.enabled": True}).dp
    node = {"data-path": str(data), "dp-state-dir": str(tmp_path / "state")}
    store = ledger_store(dp, node, state=None)
    assert isinstance(store, FileLedgerStore)
    ledger = open_ledger(dp, node, store, n_examples=170)
    ledger.ensure_calibrated(dp.epsilon, 8 / 170, 3 * 16)
    for _ in range(2):
        ledger.authorize(8 / 170, 16)
        ledger.record(8 / 170, 16)
    store.save(ledger)
    spent = ledger.epsilon()

    restarted = open_ledger(dp, node, ledger_store(dp, node, state=None), n_examples=170)  # a new process
    assert restarted.epsilon() == pytest.approx(spent, abs=1e-12) and restarted.steps == 32
    assert restarted.noise_multiplier == ledger.noise_multiplier  # sigma is not re-calibrated from zero
    restarted.authorize(8 / 170, 16)
    restarted.record(8 / 170, 16)
    assert restarted.epsilon() > spent
    with pytest.raises(PrivacyBudgetExhausted, match="PrivacyBudgetExhausted: privacy budget exhausted"):
        restarted.authorize(8 / 170, 16)


def test_context_state_ledger_round_trips():
    from flwr.app import RecordDict

    store = ContextLedgerStore(RecordDict())
    assert store.load() is None
    ledger = PrivacyLedger(target_epsilon=4.0, delta=1e-4, accountant="rdp", noise_multiplier=1.1)
    ledger.record(0.05, 10)
    ledger.record(0.05, 10)
    store.save(ledger)
    assert store.load() == ledger


def test_own_budget_precedence():
    dp = load_config({"dp.epsilon": 8.0, "dp.client-epsilons": "8, 2.5"}).dp
    assert own_budget(dp, {"partition-id": 1}) == 2.5
    assert own_budget(dp, {"partition-id": 2}) == 8.0
    assert own_budget(dp, {"partition-id": 1, "dp-epsilon": 1.0}) == 1.0


def test_poisson_batches_sample_at_the_rate():
    batches = poisson_batches(1000, 0.05, 400, seed=0)
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 50) < 2 and sizes.std() > 3  # variable sizes, as Poisson sampling must give


def test_client_level_dp_clips_updates_and_reports_epsilon(tmp_path):
    """One noisy run: every institution's update, far above the bound after training, reached the server clipped
    to it (the noise is added to the aggregate after that), and the reported epsilon is the accountant's."""
    from tests.conftest import run_cli

    bound = 1e-3
    noisy = run_cli("simulate", "--clients", "2", "--rounds", "1", "--dp", "--dp-level", "client", "--no-zk",
                    "--max-grad-norm", str(bound), "--set", "dp.noise-multiplier=1.5",
                    "--out", str(tmp_path), "--run-id", "cl-noise")
    assert noisy.returncode == 0, noisy.stdout[-3000:] + noisy.stderr[-3000:]
    last = read_jsonl_records(tmp_path / "cl-noise" / "metrics.jsonl")[-1]
    trained = [c["update_norm"] for c in last["clients"].values()]  # what training gave, before the clipping mod
    assert len(trained) == 2 and all(n > 10 * bound for n in trained), trained
    # the server rejects any update whose norm it measures above the clipping norm: both arrived clipped
    assert f"update norm bound {bound:g}" in noisy.stdout
    assert last["num_clients"] == 2 and not last["rejected"]
    rec = last["client_level_privacy"]
    assert rec["epsilon"] == pytest.approx(epsilon_of([(1.5, 1.0, 1)], rec["delta"], "rdp"), rel=1e-9)
    assert "client-level DP: epsilon" in noisy.stdout


def test_fedprox_term_under_dp_pulls_towards_global(tiny):
    from finlora.client.dp_train import dp_train_round

    cfg, bundle, data, _batch, arrays = tiny

    def drift(mu: float) -> float:
        load_lora_state(bundle.model, arrays)
        ledger = PrivacyLedger(target_epsilon=1e9, delta=1e-5, accountant="rdp", noise_multiplier=0.5)
        dp_train_round(bundle.model, data.train, cfg.train, cfg.dp, ledger, 0.01, bundle.tokenizer.pad_token_id,
                       seed=3, proximal_mu=mu, global_arrays=arrays)
        after = lora_state(bundle.model)
        return sum(float(np.sum((after[k] - arrays[k]) ** 2)) for k in arrays)

    assert drift(50.0) < 0.7 * drift(0.0)


def test_the_privacy_engine_authorizes_trains_records_and_saves_in_one_call(tiny, tmp_path):
    """client/privacy_engine.py: the whole sequence from one entry point; an exhausted budget refuses *before*
    the model moves, and what was spent is on disk (a new process sees it)."""
    cfg, bundle, data, _batch, arrays = tiny
    cfg = load_config({"dp.enabled": True, "lora.dropout": 0.0, "num-rounds": 2, "train.local-steps": 2})
    data_file = tmp_path / "bank-a.jsonl"
    data_file.write_text("")
    node = {"data-path": str(data_file), "dp-state-dir": str(tmp_path / "ledger")}
    pad = bundle.tokenizer.pad_token_id
    load_lora_state(bundle.model, arrays)
    for round_ in (1, 2):
        engine = InstitutionPrivacyEngine(cfg, node, None, len(data.train))  # a fresh process each round
        engine.train_round(bundle.model, data.train, 0.01, pad, seed=round_)
        saved = ledger_store(cfg.dp, node, None).load()
        assert saved.steps == 2 * round_ and saved.epsilon() == pytest.approx(engine.report()["dp-epsilon"])
    assert engine.report()["dp-epsilon"] <= cfg.dp.epsilon * (1 + 1e-9)
    before = lora_state(bundle.model)
    with pytest.raises(PrivacyBudgetExhausted):  # the run's planned steps are spent: a third round is refused
        InstitutionPrivacyEngine(cfg, node, None, len(data.train)).train_round(bundle.model, data.train, 0.01, pad,
                                                                               seed=3)
    after = lora_state(bundle.model)
    assert all(np.array_equal(before[k], after[k]) for k in before), "refused before training"
    assert ledger_store(cfg.dp, node, None).load().steps == 4, "a refused round spends nothing"
