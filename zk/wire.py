"""Byte encodings of a submission, for carrying it over Flower (ConfigRecord bytes + one int array)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finlora.zk.commit import GROUP_ORDER, POINT_BYTES, SCALAR_BYTES
from finlora.zk.encoding import in_range


def _chunks(data: bytes, size: int, what: str) -> list[bytes]:
    if len(data) % size:
        raise ValueError(f"{what}: {len(data)} bytes is not a multiple of {size}")
    return [bytes(data[i: i + size]) for i in range(0, len(data), size)]


def pack_commitments(commitments: Sequence[bytes]) -> bytes:
    """Row commitments, 48 compressed bytes each, concatenated."""
    if any(len(c) != POINT_BYTES for c in commitments):
        raise ValueError(f"every row commitment must be {POINT_BYTES} bytes")
    return b"".join(commitments)


def unpack_commitments(data: bytes) -> list[bytes]:
    return _chunks(data, POINT_BYTES, "commitments")


def pack_scalars(values: Sequence[int], what: str = "field elements") -> bytes:
    """Field elements as 32-byte little-endian scalars, concatenated (blindings, masked vectors, Shamir shares)."""
    if any(not 0 <= v < GROUP_ORDER for v in values):
        raise ValueError(f"{what} must be reduced mod the group order")
    return b"".join(int(v).to_bytes(SCALAR_BYTES, "little") for v in values)


def unpack_scalars(data: bytes, what: str = "field elements") -> list[int]:
    """Field elements back as ints (not reduced: whoever checks them rejects any >= r)."""
    return [int.from_bytes(c, "little") for c in _chunks(data, SCALAR_BYTES, what)]


def pack_blindings(blindings: Sequence[int]) -> bytes:
    """Blindings as 32-byte little-endian scalars, concatenated."""
    return pack_scalars(blindings, "blindings")


def unpack_blindings(data: bytes) -> list[int]:
    """Blindings back as ints (not reduced: verification rejects any >= r as malformed)."""
    return unpack_scalars(data, "blindings")


def values_to_wire(values: np.ndarray, bits: int) -> np.ndarray:
    """The int64 vector as int8/int16 (4x/2x smaller than float32); refuses values out of range."""
    if not in_range(values, bits):
        raise ValueError(f"values exceed the {bits}-bit range")
    return values.astype(np.int8 if bits == 8 else np.int16)


def values_from_wire(array: np.ndarray) -> np.ndarray:
    """Back to a flat int64 vector (any integer dtype accepted; range is checked by verification)."""
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"values must be integers, got {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)
