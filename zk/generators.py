"""Public Pedersen generators G_0..G_{2047}, H on BLS12-381 G1, from hash-to-curve with a fixed tag.

Why hash-to-curve: nobody knows the discrete logs between them, which is what makes the commitments binding.
Deriving them as scalar * G with known scalars would let anyone open a commitment two ways.
"""

from __future__ import annotations

import hashlib

from py_arkworks_bls12381 import G1Point

ROW_SIZE = 4096
"""Values per Hyrax row: each row gets one commitment over G_0..G_{ROW_SIZE-1} plus H.

4,096 rather than the 2,048 first proposed: each row costs 80 bytes on the wire (a 48-byte commitment and a
32-byte blinding), so at Llama-3.1-8B's 4.72 M values 2,048-value rows add 184 kB per client per round, over
the 100 kB budget, and 4,096-value rows add 92 kB. The MSM work is the same (it scales with the values, not
the rows), and 1,152 rows x 4,096 columns is still a square-ish Hyrax matrix, so a later norm proof's size,
O(rows + columns), stays as small."""

DST = b"FINLORA-ZK-V1-PEDERSEN_BLS12381G1_XMD:SHA-256_SSWU_RO_"

PINNED_DIGEST = "d0c1a800c47e7c2492ba6440a1c8688112479d6b8a39e9da833b6ca1e6556437"
"""sha256 over the compressed bytes of G_0..G_2047 then H; recomputed and checked once per process."""

_GENERATOR_CACHE: dict[str, tuple[tuple[G1Point, ...], G1Point]] = {}
_EXTRA_CACHE: dict[str, list[G1Point]] = {"extra": []}
"""Generators beyond ROW_SIZE, derived on demand (the norm proof's bit rows can be wider than a value row)."""


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


def wide_generators(n: int) -> tuple[G1Point, ...]:
    """G_0..G_{n-1} of the same hash-to-curve family: the pinned first ``ROW_SIZE``, then G_j = H2C("G" || j).

    The norm proof commits bit rows up to 32x wider than a value row so that its bit-row commitments stay few
    (proof size); the extra generators cost ~0.3 ms each to derive, once per process.
    """
    if n <= ROW_SIZE:
        return generators(n)[0]
    gens = generators()[0]
    extra = _EXTRA_CACHE["extra"]
    for j in range(ROW_SIZE + len(extra), n):
        extra.append(G1Point.hash_to_curve(b"G" + j.to_bytes(4, "big"), DST))
    return (*gens, *extra[: n - ROW_SIZE])


def proof_points() -> tuple[G1Point, G1Point]:
    """(S, U): the base of scalar commitments v*S + r*H and the inner-product argument's extra base.

    Both from hash-to-curve with their own labels, so nobody knows a discrete-log relation between them and
    the G_j or H.
    """
    if "proof" not in _GENERATOR_CACHE:
        _GENERATOR_CACHE["proof"] = ((G1Point.hash_to_curve(b"S", DST),), G1Point.hash_to_curve(b"U", DST))
    (s,), u = _GENERATOR_CACHE["proof"]
    return s, u
