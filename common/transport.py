"""How a float update travels: its norm bound, and its wire precision (``transport.dtype``).

Both sides use this module: the institution encodes its update, the server decodes it before validating and
aggregating, always back to float32 absolute LoRA weights, so Flower's strategies average exactly what they
would have averaged in float32 (only the rounding of the wire format differs).

* ``float32``: the adapter's A/B values themselves, as before (what Flower's client-level clipping mod expects).
* ``float16``: the delta (local minus the global adapter the server sent), in half precision: the delta is
  small and centred on zero, so half precision loses far less of it than of the weights.
* ``int8``: the delta with one float32 scale per tensor (``scale = max |delta| / 127``), rounded to nearest.

Before encoding, the delta is clipped to ``max_norm`` (L2 over all tensors), and after encoding the decoded
delta is checked against it again (rounding can push it a hair over), so an honest institution never
trips the server's bound. The server rejects any reply whose decoded delta exceeds the bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from finlora.common.adapter import AdapterError, Arrays

TRANSPORT_RECORD = "transport"
"""Name of the ConfigRecord that says how the arrays of a reply are encoded (absent: float32 weights)."""

DTYPES = ("float32", "float16", "int8")
INT8_MAX = 127
NORM_SLACK = 1e-3
"""Relative tolerance of the server's norm check: float32 rounding of ``global + delta`` on the way back."""


@dataclass(frozen=True)
class EncodedUpdate:
    """What goes on the wire, and what the institution reports about it."""

    arrays: Arrays
    record: dict[str, Any]
    norm: float
    clipped: bool


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors, accumulated in float64."""
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in delta.values())))


def _encode_delta(delta: Mapping[str, np.ndarray], dtype: str) -> tuple[Arrays, dict[str, Any]]:
    if dtype == "float16":
        return {k: v.astype(np.float16) for k, v in delta.items()}, {"dtype": "float16", "encoding": "delta"}
    arrays, record = {}, {"dtype": "int8", "encoding": "delta"}
    for key, value in delta.items():
        peak = float(np.abs(value).max()) if value.size else 0.0
        scale = peak / INT8_MAX if peak > 0 else 1.0
        arrays[key] = np.clip(np.rint(value / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        record[f"scale.{key}"] = scale
    return arrays, record


def _decode_delta(arrays: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if record.get("dtype") == "float16":
        return {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    return {k: np.asarray(v, np.float64) * float(record[f"scale.{k}"]) for k, v in arrays.items()}


def encode_update(local: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray], dtype: str,
                  max_norm: float) -> EncodedUpdate:
    """Clip the update to ``max_norm`` (0: no bound) and encode it as ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"transport.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    delta = {k: np.asarray(local[k], np.float64) - np.asarray(global_arrays[k], np.float64) for k in local}
    norm = delta_norm(delta)
    clipped = max_norm > 0 and norm > max_norm
    if clipped:
        delta = {k: v * (max_norm / norm) for k, v in delta.items()}
    for _attempt in range(8):
        if dtype == "float32":
            arrays: Arrays = {k: (np.asarray(global_arrays[k], np.float64) + v).astype(np.float32)
                              for k, v in delta.items()}
            record: dict[str, Any] = {}
            decoded = {k: arrays[k].astype(np.float64) - np.asarray(global_arrays[k], np.float32) for k in arrays}
        else:
            arrays, record = _encode_delta(delta, dtype)
            decoded = _decode_delta(arrays, record)
        sent_norm = delta_norm(decoded)
        if max_norm <= 0 or sent_norm <= max_norm:
            break
        clipped = True  # rounding pushed it over: shrink a little and encode again
        delta = {k: v * (max_norm / sent_norm) * (1 - 1e-4) for k, v in delta.items()}
    return EncodedUpdate(arrays, record, sent_norm, clipped)


def wire_dtype(record: Mapping[str, Any] | None, source: str) -> str | None:
    """The dtype a reply's transport record declares (``None``: plain float weights of any float type)."""
    if not record:
        return None
    dtype = record.get("dtype")
    if dtype not in ("float16", "int8") or record.get("encoding") != "delta":
        raise AdapterError(f"{source}: unknown transport encoding {dict(record)}")
    return str(dtype)


def decode_update(arrays: Mapping[str, np.ndarray], record: Mapping[str, Any] | None,
                  global_arrays: Mapping[str, np.ndarray], source: str) -> Arrays:
    """float32 absolute weights from a reply's arrays (already checked against the declared :func:`wire_dtype`);
    ``record`` is the reply's transport ConfigRecord, if any. Raises :class:`AdapterError` naming ``source``."""
    dtype = wire_dtype(record, source)
    if dtype is None:
        return {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    if dtype == "int8":
        for key in arrays:
            scale = record.get(f"scale.{key}")  # type: ignore[union-attr]
            if not isinstance(scale, float) or not np.isfinite(scale) or scale <= 0:
                raise AdapterError(f"{source}: '{key}' needs a positive finite float scale, got {scale!r}")
    delta = _decode_delta(arrays, record)  # type: ignore[arg-type]
    return {k: (np.asarray(global_arrays[k], np.float64) + v).astype(np.float32) for k, v in delta.items()}
