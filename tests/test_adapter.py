import numpy as np
import pytest
import torch

from finlora.common.adapter import (AdapterError, arrays_digest, check_arrays, complete_with_shared_a, initial_adapter,
                                    is_lora_a, load_lora_state, lora_state, read_adapter_dir, save_adapter_dir,
                                    select_keys, shapes_of, shared_lora_a)
from finlora.common.config import load_config
from finlora.common.model import LOAD_COUNTS, get_model_bundle, lora_config, lora_shapes, resolve_model_path
from finlora.common.tiny import build_tiny, directory_digest


def _bundle(**overrides):
    cfg = load_config(overrides)
    return cfg, get_model_bundle(cfg.model, cfg.lora)


def test_tiny_model_is_deterministic(tmp_path):
    build_tiny(tmp_path / "a")
    build_tiny(tmp_path / "b")
    assert directory_digest(tmp_path / "a") == directory_digest(tmp_path / "b")


def test_only_lora_tensors_and_default_finlora_shape():
    cfg, bundle = _bundle()
    state = lora_state(bundle.model)
    assert state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert {k.split(".")[-3] for k in state} == {"q_proj", "k_proj", "v_proj"}
    assert all(v.shape[0] == 8 for k, v in state.items() if is_lora_a(k))
    assert shapes_of(state) == lora_shapes(cfg.model, cfg.lora)  # meta-device shapes match the real model


def test_base_model_loaded_once_per_process():
    _bundle()
    loads = LOAD_COUNTS["base_model_loads"]
    for _ in range(3):
        _bundle()
    assert LOAD_COUNTS["base_model_loads"] == loads


def test_check_arrays_rejects_bad_updates():
    shapes = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (3, 2)}
    good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    check_arrays(good, shapes, "update")
    with pytest.raises(AdapterError, match="NaN"):
        check_arrays({**good, "m.lora_B.weight": np.full((3, 2), np.nan, np.float32)}, shapes, "update")
    with pytest.raises(AdapterError, match="shape"):
        check_arrays({**good, "m.lora_B.weight": np.zeros((2, 3), np.float32)}, shapes, "update")
    with pytest.raises(AdapterError, match="unexpected.*embed"):
        check_arrays({**good, "model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, shapes, "update")
    with pytest.raises(AdapterError, match="missing"):
        check_arrays({"m.lora_A.weight": good["m.lora_A.weight"]}, shapes, "update")


def test_shared_a_is_deterministic_and_ffa_sends_only_b():
    a1 = shared_lora_a("x.lora_A.weight", (8, 64), seed=3)
    assert np.array_equal(a1, shared_lora_a("x.lora_A.weight", (8, 64), seed=3))
    assert not np.array_equal(a1, shared_lora_a("y.lora_A.weight", (8, 64), seed=3))
    assert np.abs(a1).max() <= 1 / 8
    shapes = {"x.lora_A.weight": (8, 64), "x.lora_B.weight": (64, 8)}
    init = initial_adapter(shapes, seed=3)
    assert not init["x.lora_B.weight"].any()
    assert list(select_keys(init, ffa=True)) == ["x.lora_B.weight"]
    assert arrays_digest(complete_with_shared_a(select_keys(init, True), shapes, 3)) == arrays_digest(init)


def test_saved_adapter_loads_with_peft_and_gives_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, bundle = _bundle()
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in lora_state(bundle.model).items()}
    load_lora_state(bundle.model, arrays)
    save_adapter_dir(arrays, lora_config(cfg.lora, resolve_model_path("tiny")), tmp_path / "round-1")
    assert arrays_digest(read_adapter_dir(tmp_path / "round-1")) == arrays_digest(arrays)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    bundle.model.eval()
    with torch.no_grad():
        expected = bundle.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
        loaded = PeftModel.from_pretrained(base, tmp_path / "round-1").eval()
        got = loaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter really changes the model
