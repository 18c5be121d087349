"""Encoding of a LoRA update as the integer vector that is committed, verified and aggregated.

Why integers: the server aggregates exactly the committed values, so sum of commitments == commitment of the
aggregate (Pedersen is additively homomorphic over integers mod the group order, not over floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Which tensors the flat vector covers, in canonical (sorted key) order, and their shapes.

    The ledger records it so the audit knows which adapter keys an aggregate touches (FFA: only ``lora_B``).
    """

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> Layout:
        return cls(tuple((k, tuple(int(d) for d in tensors[k].shape)) for k in sorted(tensors)))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.entries)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def slices(self) -> list[tuple[str, tuple[int, ...], slice]]:
        """(key, shape, slice of the flat vector) for every entry."""
        out, start = [], 0
        for key, shape in self.entries:
            stop = start + math.prod(shape)
            out.append((key, shape, slice(start, stop)))
            start = stop
        return out

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """The concatenation of ``tensors`` in layout order; the dtype is kept (integer updates stay integer,
        so the server can rebuild a submission's values from per-key int8/int16 arrays)."""
        parts = []
        for key, shape, _ in self.slices():
            arr = np.asarray(tensors[key])
            if arr.shape != shape:
                raise ValueError(f"{key}: shape {arr.shape} != layout {shape}")
            parts.append(arr.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def to_json(self) -> list[list]:
        return [[k, list(shape)] for k, shape in self.entries]

    @classmethod
    def from_json(cls, data: list) -> Layout:
        entries = tuple((str(k), tuple(int(d) for d in shape)) for k, shape in data)
        if [k for k, _ in entries] != sorted(k for k, _ in entries):
            raise ValueError("layout keys are not in canonical (sorted) order")
        return cls(entries)


def int_limit(bits: int) -> int:
    """Largest magnitude allowed for ``bits``-bit values; symmetric so negation never overflows."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    return (1 << (bits - 1)) - 1


def in_range(values: np.ndarray, bits: int) -> bool:
    """Every value within +-(2^(bits-1) - 1); min/max rather than abs, which wraps at the dtype's minimum."""
    limit = int_limit(bits)
    return values.size == 0 or (int(np.min(values)) >= -limit and int(np.max(values)) <= limit)


def norm_within(values: np.ndarray, norm_bound: float, frac_bits: int) -> bool:
    """Exact integer test ||values||_2 <= norm_bound * 2^frac_bits (no float rounding at the boundary)."""
    sum_sq = int(np.dot(values.astype(np.int64), values.astype(np.int64)))
    return Fraction(sum_sq) <= (Fraction(norm_bound) * (1 << frac_bits)) ** 2


def _round_stochastic(scaled: np.ndarray, uniform: np.ndarray, limit: int) -> np.ndarray:
    return np.clip(np.floor(scaled + uniform), -limit, limit).astype(np.int64)


def quantize_update(delta: dict[str, np.ndarray], norm_bound: float, frac_bits: int, bits: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, Layout]:
    """Clip the update to L2 <= norm_bound, then round it stochastically to signed fixed point (scale 2^f).

    Stochastic rounding (floor(v*2^f + u), u ~ U[0,1)) is unbiased, but may push the norm a little above the
    bound; then the same draws are re-used on a slightly shrunk vector until the integer norm fits, so the
    server's exact check never rejects an honest client. Values saturate at +-(2^(bits-1) - 1).
    Clipping is post-processing of the (possibly DP) update, so DP guarantees still hold.
    """
    if norm_bound <= 0:
        raise ValueError("norm_bound must be positive")
    limit = int_limit(bits)
    layout = Layout.from_tensors(delta)
    flat = layout.flatten(delta).astype(np.float64)
    norm = float(np.linalg.norm(flat))
    if norm > norm_bound:
        flat = flat * (norm_bound / norm)
    scaled = flat * float(1 << frac_bits)
    uniform = rng.random(flat.shape[0])
    q = _round_stochastic(scaled, uniform, limit)
    target = norm_bound * float(1 << frac_bits)
    shrink = 1.0
    while not norm_within(q, norm_bound, frac_bits):
        ratio = target / float(np.linalg.norm(q.astype(np.float64)))
        shrink *= max(0.5, min(0.999, ratio))
        q = _round_stochastic(scaled * shrink, uniform, limit)
    return q, layout


def dequantize(values: np.ndarray, layout: Layout, frac_bits: int) -> dict[str, np.ndarray]:
    """Float32 tensors (by layout key) that the integer vector stands for."""
    flat = values.astype(np.float64) / float(1 << frac_bits)
    return {key: flat[sl].reshape(shape).astype(np.float32) for key, shape, sl in layout.slices()}


def apply_aggregate(prev: dict[str, np.ndarray], aggregate: np.ndarray, layout: Layout, total_weight: int,
                    frac_bits: int) -> dict[str, np.ndarray]:
    """The next global adapter: prev + A / (N * 2^f) on the layout's keys, every other key copied unchanged.

    The one function the server and the audit both call, so they agree bit for bit: float64 arithmetic in a
    fixed order, then cast to float32.
    """
    if aggregate.shape != (layout.size,):
        raise ValueError(f"aggregate has shape {aggregate.shape}, layout needs ({layout.size},)")
    if total_weight <= 0:
        raise ValueError("total_weight must be positive")
    denom = float(total_weight) * float(1 << frac_bits)
    out = {key: np.array(value, copy=True) for key, value in prev.items()}
    for key, shape, sl in layout.slices():
        if key not in prev or tuple(prev[key].shape) != shape:
            raise ValueError(f"previous adapter has no tensor {key} of shape {shape}")
        step = aggregate[sl].astype(np.float64) / denom
        out[key] = (prev[key].astype(np.float64) + step.reshape(shape)).astype(np.float32)
    return out
