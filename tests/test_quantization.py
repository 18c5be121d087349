"""Real bitsandbytes quantization on CPU (issue "real model", part 2): an explicit ``model.quantization`` of 4 or 8
loads ``Linear4bit`` / ``Linear8bitLt`` layers, LoRA trains on top (plain and DP-SGD), and the saved adapter loads
with plain PEFT on an unquantized base. ``auto`` (the default) stays unquantized on a CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from finlora.client.dp_train import dp_train_round
from finlora.client.local_data import local_data
from finlora.client.privacy import PrivacyLedger
from finlora.client.train import train_round
from finlora.common.adapter import load_lora_state, lora_state, save_adapter_dir
from finlora.common.config import load_config
from finlora.common.model import get_model_bundle, lora_config, resolve_model_path

LAYER = {"4": "Linear4bit", "8": "Linear8bitLt"}


@pytest.fixture(scope="module", params=["4", "8"])
def quantized(request):
    cfg = load_config({"model.quantization": request.param, "train.local-steps": 2, "train.batch-size": 4,
                       "lora.dropout": 0.0})
    bundle = get_model_bundle(cfg.model, cfg.lora)
    data = local_data(cfg.data, ("", 0, 3), bundle.tokenizer)
    return request.param, cfg, bundle, data


def test_an_explicit_4_or_8_really_quantizes_on_cpu(quantized):
    quantization, _, bundle, _ = quantized
    assert bundle.quantized == quantization
    base_layers = {type(m).__name__ for n, m in bundle.model.named_modules() if n.endswith("q_proj.base_layer")}
    assert base_layers == {LAYER[quantization]}, base_layers


def test_lora_trains_on_the_quantized_base_with_and_without_dp(quantized):
    _, cfg, bundle, data = quantized
    zero = {k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in lora_state(bundle.model).items()}
    load_lora_state(bundle.model, zero)
    train_round(bundle.model, data.train, cfg.train, 0.01, bundle.tokenizer.pad_token_id, seed=1)
    trained = lora_state(bundle.model)
    assert any(np.abs(trained[k]).sum() > 0 for k in trained if ".lora_B." in k)  # gradients reached LoRA B
    load_lora_state(bundle.model, zero)
    ledger = PrivacyLedger(target_epsilon=1e9, delta=1e-5, accountant="rdp", noise_multiplier=1.0)
    dp_train_round(bundle.model, data.train, cfg.train, cfg.dp, ledger, 0.01, bundle.tokenizer.pad_token_id, seed=1)
    assert ledger.steps > 0 and all(np.isfinite(v).all() for v in lora_state(bundle.model).values())
    assert any(np.abs(v).sum() > 0 for k, v in lora_state(bundle.model).items() if ".lora_B." in k)


def test_the_adapter_loads_with_plain_peft_on_an_unquantized_base(quantized, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantization, cfg, bundle, _ = quantized
    rng = np.random.default_rng(3)
    arrays = {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if ".lora_B." in k else v)
              for k, v in lora_state(bundle.model).items()}
    load_lora_state(bundle.model, arrays)
    path = resolve_model_path(cfg.model.name)
    save_adapter_dir(arrays, lora_config(cfg.lora, path), tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                      str(tmp_path / "adapter")).eval()
    ids = torch.tensor([bundle.tokenizer("Operating profit rose to EUR 13.1 mn .")["input_ids"]])
    bundle.model.eval()
    with torch.no_grad():
        ours, theirs = bundle.model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
    assert cosine > 0.98, (quantization, cosine)  # the same model up to the base's quantization error


def test_auto_is_unquantized_on_cpu():
    from finlora.common.model import effective_quantization

    assert effective_quantization("auto", cuda=False) == "none" and effective_quantization("auto", cuda=True) == "4"
    assert effective_quantization("8", cuda=False) == "8"
    cfg = load_config()
    assert cfg.model.quantization == "auto"
    assert get_model_bundle(dataclasses.replace(cfg.model), cfg.lora).quantized == (
        "4" if torch.cuda.is_available() else "none")


def test_the_benchmark_eval_runs_on_the_quantized_model(quantized, tmp_path):
    import json

    from finlora.common.sample_data import sentiment_rows
    from finlora.eval import evaluate_model

    _, _, bundle, _ = quantized
    (tmp_path / "fpb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=6, seed=8)))
    result = evaluate_model(bundle.model, bundle.tokenizer, "fpb", tmp_path, max_samples=6, mode="fast",
                            batch_size=3, progress=False)["fpb"]
    assert result.status == "ok" and result.n == 6 and 0 <= result.accuracy <= 1
