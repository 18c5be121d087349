"""Base model loading (hub id, local dir or the built-in tiny model), quantization and LoRA attachment.

The base model is by far the most expensive thing an institution holds, so it is loaded once per process
and kept in :data:`MODEL_CACHE`; between rounds only the adapter's weights are swapped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora.common.adapter import is_lora_key
from finlora.common.config import LoraSettings, ModelConfig
from finlora.common.gguf_model import SMOLLM2_NAME, gguf_model_dir, smollm2_model_dir
from finlora.common.logs import get_logger
from finlora.common.tiny import TINY_NAME, tiny_model_dir

log = get_logger(__name__)

QUANTIZATIONS = ("auto", "4", "8", "none")
QUANTIZATION_BITS = {"4": 4, "8": 8, "none": 0}
"""Bits per base-model weight as institutions report it (0: unquantized float weights)."""


@dataclass
class ModelBundle:
    """A PEFT-wrapped causal LM, its tokenizer, and what loading it cost (for reports and benchmarks)."""

    model: Any
    tokenizer: Any
    load_seconds: float
    quantized: str


MODEL_CACHE: dict[tuple[Any, ...], ModelBundle] = {}
"""Explicit per-process cache: (model, quantization, gradient checkpointing, LoRA settings) -> bundle."""

LOAD_COUNTS: dict[str, int] = {"base_model_loads": 0}
"""How many times this process really loaded a base model (the benchmark and client metrics report it)."""


def resolve_model_path(name: str) -> str:
    """The directory or hub id transformers loads for ``model.name``.

    ``tiny`` -> its cache directory (built on first use); ``smollm2`` and a ``.gguf`` file -> their converted
    cache directory (converted once, see :mod:`common.gguf_model`); anything else is passed to transformers.
    """
    if name == TINY_NAME:
        return str(tiny_model_dir())
    if name == SMOLLM2_NAME:
        return str(smollm2_model_dir())
    if name.endswith(".gguf") and Path(name).expanduser().is_file():
        return str(gguf_model_dir(Path(name).expanduser()))
    return name


def effective_quantization(requested: str, cuda: bool) -> str:
    """What ``model.quantization`` loads: ``auto`` is 4-bit NF4 on a GPU and unquantized on a CPU (bitsandbytes runs
    there, ~3x slower per step); an explicit ``4`` or ``8`` is always real bitsandbytes quantization."""
    if requested == "auto":
        return "4" if cuda else "none"
    return requested


def quantization_config(quantization: str, cuda: bool) -> Any:
    """bitsandbytes settings for ``4`` (NF4, double quantization) or ``8`` (LLM.int8); ``None`` for ``none``."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    if quantization == "8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(cfg: ModelConfig) -> tuple[Any, Any, str]:
    """Load tokenizer and causal LM; returns ``(model, tokenizer, quantization really used)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization must be one of {QUANTIZATIONS}, got '{cfg.quantization}'")
    path = resolve_model_path(cfg.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    effective = effective_quantization(cfg.quantization, cuda)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if effective != "none":
        kwargs["quantization_config"] = quantization_config(effective, cuda)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    LOAD_COUNTS["base_model_loads"] += 1
    # Frozen base. Unlike PEFT's prepare_model_for_kbit_training, the embeddings, norms and LM head are *not*
    # upcast to fp32: on an 8B model that costs GiBs and a cast per step, and the training step already runs
    # under bf16 autocast with fp32 LoRA weights (client/train.py).
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer, effective


def lora_config(lora: LoraSettings, base_model_name_or_path: str) -> Any:
    """The PEFT ``LoraConfig`` for these settings (also what ``adapter_config.json`` holds)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_module_list, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)


def attach_lora(model: Any, lora: LoraSettings, base_model_name_or_path: str) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter; in FFA mode every ``lora_A`` is frozen."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(lora, base_model_name_or_path))
    if lora.ffa:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def get_model_bundle(model_cfg: ModelConfig, lora: LoraSettings) -> ModelBundle:
    """The cached PEFT model for this configuration, loading it on first use in this process."""
    key = (model_cfg.name, model_cfg.quantization, model_cfg.gradient_checkpointing, lora)
    bundle = MODEL_CACHE.get(key)
    if bundle is None:
        start = time.perf_counter()
        model, tokenizer, effective = load_base_model(model_cfg)
        peft_model = attach_lora(model, lora, base_model_name_or_path=resolve_model_path(model_cfg.name))
        bundle = ModelBundle(peft_model, tokenizer, time.perf_counter() - start, effective)
        MODEL_CACHE[key] = bundle
        log.info("loaded base model %s (quantization %s) in %.1fs", model_cfg.name, effective,
                 bundle.load_seconds)
    return bundle


def lora_shapes(model_cfg: ModelConfig, lora: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Shapes of every LoRA A/B tensor, from the model's config alone (no weights are loaded).

    The server needs them to create the initial adapter and to check updates, but it should not have to
    hold an 8B base model just for that: the model is instantiated on the ``meta`` device.
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model_cfg.name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        peft_model = get_peft_model(model, lora_config(lora, path))
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: tuple(v.shape) for k, v in sorted(state.items()) if is_lora_key(k)}
