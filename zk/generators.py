"""Public Pedersen generators G_0..G_{2047}, H on BLS12-381 G1, from hash-to-curve with a fixed tag.

Why hash-to-curve: nobody knows the discrete logs between them, which is what makes the commitments binding.
Deriving them as scalar * G with known scalars would let anyone open a commitment two ways.
"""

from __future__ import annotations

import hashlib

from py_arkworks_bls12381 import G1Point

ROW_SIZE = 2048
"""Values per Hyrax row: each row gets one commitment over G_0..G_{ROW_SIZE-1} plus H."""

DST = b"FINLORA-ZK-V1-PEDERSEN_BLS12381G1_XMD:SHA-256_SSWU_RO_"

PINNED_DIGEST = "fc1ee92c43e22761b77549fe276f9f6c572cced054d0180037ccc3e1ded54e9c"
"""sha256 over the compressed bytes of G_0..G_2047 then H; recomputed and checked once per process."""

_GENERATOR_CACHE: dict[str, tuple[tuple[G1Point, ...], G1Point]] = {}


def derive_generators() -> tuple[tuple[G1Point, ...], G1Point]:
    """Hash-to-curve every generator (~0.6 s); no caching, no check (the test calls this to re-pin)."""
    gens = tuple(G1Point.hash_to_curve(b"G" + j.to_bytes(4, "big"), DST) for j in range(ROW_SIZE))
    return gens, G1Point.hash_to_curve(b"H", DST)


def generators_digest(gens: tuple[G1Point, ...], h: G1Point) -> str:
    digest = hashlib.sha256()
    for point in (*gens, h):
        digest.update(point.to_compressed_bytes())
    return digest.hexdigest()


def generators(n: int = ROW_SIZE) -> tuple[tuple[G1Point, ...], G1Point]:
    """(G_0..G_{n-1}, H), derived once per process and checked against ``PINNED_DIGEST``."""
    if not 0 < n <= ROW_SIZE:
        raise ValueError(f"n must be in 1..{ROW_SIZE}")
    if "pinned" not in _GENERATOR_CACHE:
        gens, h = derive_generators()
        got = generators_digest(gens, h)
        if got != PINNED_DIGEST:
            raise RuntimeError(f"Pedersen generators digest {got} != pinned {PINNED_DIGEST}: library or code drift")
        _GENERATOR_CACHE["pinned"] = (gens, h)
    gens, h = _GENERATOR_CACHE["pinned"]
    return gens[:n], h
