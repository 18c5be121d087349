"""LoRA adapter arrays: the only thing that crosses the wire and the only thing the server holds.

An adapter is a ``dict`` from PEFT state-dict names (``...q_proj.lora_A.weight``, as returned by
``get_peft_model_state_dict``) to float32 numpy arrays. PEFT's own functions read and write the model, and
PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``) is written without needing
the model, because those names are exactly the keys of the safetensors file.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finlora.common.io import atomic_write_dir

Arrays = dict[str, np.ndarray]

LORA_KEY = re.compile(r"\.lora_([AB])\.weight$")
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """Adapter arrays do not fit the expected keys, shapes or values."""


def is_lora_key(key: str) -> bool:
    return LORA_KEY.search(key) is not None


def is_lora_a(key: str) -> bool:
    return key.endswith(".lora_A.weight")


def lora_state(model: Any) -> Arrays:
    """The model's LoRA A/B weights as float32 numpy arrays, in sorted key order.

    bfloat16 weights are cast up: Flower's ``Array`` rejects bfloat16, and averaging in float32 is exact
    enough for what LoRA deltas need.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().float().cpu().numpy() for k in sorted(state) if is_lora_key(k)}


def load_lora_state(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's adapter (PEFT's ``set_peft_model_state_dict``)."""
    import torch
    from peft import set_peft_model_state_dict

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise AdapterError(f"adapter keys unknown to the model: {unexpected[:3]}")


def select_keys(arrays: Mapping[str, np.ndarray], ffa: bool) -> Arrays:
    """What travels: all A/B tensors, or only B in FFA-LoRA mode (A is re-derived from the shared seed)."""
    return {k: v for k, v in arrays.items() if is_lora_key(k) and not (ffa and is_lora_a(k))}


def shared_lora_a(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic initial A for one module: Kaiming-uniform as PEFT's default, bound 1/sqrt(fan_in).

    Seeded by (seed, crc32(key)) with numpy so every party derives the same bits without exchanging
    them, whatever torch RNG state its process happens to be in. FFA-LoRA relies on this.
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    bound = 1.0 / np.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def initial_adapter(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Arrays:
    """The round-0 global adapter: shared A, B = 0 (so the adapted model starts equal to the base)."""
    return {k: shared_lora_a(k, shape, seed) if is_lora_a(k) else np.zeros(shape, np.float32)
            for k, shape in sorted(shapes.items())}


def complete_with_shared_a(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                           seed: int) -> Arrays:
    """Add the seed-derived A to B-only (FFA) arrays, giving the full adapter to save or evaluate."""
    full = {k: shared_lora_a(k, shape, seed) for k, shape in shapes.items() if is_lora_a(k)}
    full.update(arrays)
    return dict(sorted(full.items()))


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 source: str, integer: bool = False, dtype: str | None = None) -> None:
    """Raise :class:`AdapterError` unless ``arrays`` has exactly the expected keys and shapes, all finite
    (``integer``: quantized zk updates, which must be integer arrays instead of float ones; ``dtype``: the
    exact dtype a reply declared for its wire encoding)."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise AdapterError(f"{source}: keys differ from the adapter's: missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                           f"{'...' if len(extra) > 3 else ''}")
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise AdapterError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {tuple(expected[key])}")
        if dtype is not None and value.dtype != np.dtype(dtype):
            raise AdapterError(f"{source}: '{key}' has dtype {value.dtype}, expected {dtype}")
        if integer or (dtype is not None and np.issubdtype(np.dtype(dtype), np.integer)):
            if not np.issubdtype(value.dtype, np.integer):
                raise AdapterError(f"{source}: '{key}' has dtype {value.dtype}, expected integers (zk)")
            continue
        if not np.issubdtype(value.dtype, np.floating):
            raise AdapterError(f"{source}: '{key}' has dtype {value.dtype}, expected a float type")
        if not np.isfinite(value).all():
            raise AdapterError(f"{source}: '{key}' holds NaN or infinite values")


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over keys, shapes and float32 bytes in sorted key order: identifies an adapter's content."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key], dtype=np.float32)
        h.update(key.encode())
        h.update(str(value.shape).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def to_array_record(arrays: Mapping[str, np.ndarray]) -> Any:
    """Flower ``ArrayRecord`` keyed by the PEFT names. Floats travel as float32 (Flower rejects bfloat16) unless
    they already are float16; integer arrays (int8 transport) keep their type."""
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for key in sorted(arrays):
        value = np.asarray(arrays[key])
        keep = value.dtype == np.float16 or np.issubdtype(value.dtype, np.integer)
        record[key] = Array(np.ascontiguousarray(value, dtype=value.dtype if keep else np.float32))
    return record


def from_array_record(record: Any) -> Arrays:
    return {key: record[key].numpy() for key in sorted(record.keys())}


def save_adapter_dir(arrays: Mapping[str, np.ndarray], peft_config: Any, out_dir: Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a standard PEFT adapter directory atomically (loadable by ``PeftModel.from_pretrained``)."""
    from safetensors.numpy import save_file

    def fill(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}, str(tmp / ADAPTER_FILE),
                  metadata={"format": "pt", **(metadata or {})})

    atomic_write_dir(out_dir, fill)


def read_adapter_dir(path: Path) -> Arrays:
    """LoRA arrays of a PEFT adapter directory."""
    from safetensors.numpy import load_file

    file = Path(path) / ADAPTER_FILE
    if not file.is_file() or not (Path(path) / CONFIG_FILE).is_file():
        raise AdapterError(f"{path}: not a PEFT adapter directory ({CONFIG_FILE} and {ADAPTER_FILE} expected)")
    return {k: v for k, v in sorted(load_file(str(file)).items()) if is_lora_key(k)}
