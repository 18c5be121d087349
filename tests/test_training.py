import numpy as np

from client.local_data import local_data
from client.train import _state_key, round_learning_rate, train_round
from common.adapter import initial_adapter, load_lora_state, lora_state, shapes_of
from common.config import load_config
from common.evaluation import answer_loss
from common.model import get_model_bundle


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
