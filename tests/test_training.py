import numpy as np

from finlora.client.local_data import local_data
from finlora.client.train import _state_key, round_learning_rate, train_round
from finlora.common.adapter import initial_adapter, load_lora_state, lora_state, shapes_of
from finlora.common.config import load_config
from finlora.common.evaluation import answer_loss
from finlora.common.model import get_model_bundle


def _setup():
    cfg = load_config()
    bundle = get_model_bundle(cfg.model, cfg.lora)
    init = initial_adapter(shapes_of(lora_state(bundle.model)), cfg.lora.seed)
    load_lora_state(bundle.model, init)
    data = local_data(cfg.data, ("", 0, 2), bundle.tokenizer)
    return cfg, bundle, init, data


def test_local_training_lowers_validation_loss():
    cfg, bundle, _init, data = _setup()
    pad = bundle.tokenizer.pad_token_id
    before, _ = answer_loss(bundle.model, data.val, 16, pad)
    stats = train_round(bundle.model, data.train, cfg.train, cfg.train.lr, pad, seed=0)
    after, _ = answer_loss(bundle.model, data.val, 16, pad)
    assert stats.steps == cfg.train.local_steps and stats.examples_seen == cfg.train.local_steps * cfg.train.batch_size
    assert after < before


def test_fedprox_term_keeps_weights_near_global():
    cfg, bundle, init, data = _setup()
    pad = bundle.tokenizer.pad_token_id

    def drift(mu):
        load_lora_state(bundle.model, init)
        train_round(bundle.model, data.train, cfg.train, cfg.train.lr, pad, seed=0, proximal_mu=mu, global_arrays=init)
        after = lora_state(bundle.model)
        return sum(float(np.sum((after[k] - init[k]) ** 2)) for k in init)

    assert drift(50.0) < 0.7 * drift(0.0)


def test_state_key_matches_peft_names():
    assert _state_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_learning_rate_schedule_spans_rounds():
    train = load_config({"train.lr": 0.01, "train.lr-min-ratio": 0.1}).train
    lrs = [round_learning_rate(train, r, 5) for r in range(1, 6)]
    assert abs(lrs[0] - 0.01) < 1e-12 and abs(lrs[-1] - 0.001) < 1e-12 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert round_learning_rate(load_config({"train.lr-schedule": "constant"}).train, 4, 5) == \
        load_config().train.lr


def test_training_is_reproducible_and_works_with_gradient_checkpointing():
    cfg, bundle, init, data = _setup()
    pad = bundle.tokenizer.pad_token_id
    results = []
    for _ in range(2):
        load_lora_state(bundle.model, init)
        train_round(bundle.model, data.train, cfg.train, cfg.train.lr, pad, seed=7)
        results.append(lora_state(bundle.model))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])

    gc_cfg = load_config({"model.gradient-checkpointing": True})
    gc_bundle = get_model_bundle(gc_cfg.model, gc_cfg.lora)
    load_lora_state(gc_bundle.model, init)
    stats = train_round(gc_bundle.model, data.train, gc_cfg.train, gc_cfg.train.lr, pad, seed=7)
    after = lora_state(gc_bundle.model)
    assert stats.steps == gc_cfg.train.local_steps
    assert all(np.allclose(after[k], results[0][k], atol=1e-5) for k in after)  # same math, less memory


def test_deployed_institution_reads_its_data_path(tmp_path):
    import json

    from finlora.client.local_data import LOCAL_VAL_SIZE, node_data_key
    from finlora.common.sample_data import sentiment_rows

    path = tmp_path / "bank-a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=120, seed=5)))
    cfg = load_config()
    bundle = get_model_bundle(cfg.model, cfg.lora)
    key = node_data_key({"data-path": str(path), "partition-id": 0})
    data = local_data(cfg.data, key, bundle.tokenizer)
    assert data.source == str(path)
    assert len(data.train) + len(data.val) == 120 and len(data.val) == LOCAL_VAL_SIZE
