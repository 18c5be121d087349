"""Public Pedersen generators G_0..G_{4095}, H on BLS12-381 G1, from hash-to-curve with a fixed tag.

Why hash-to-curve: nobody knows the discrete logs between them, which is what makes the commitments binding.
Deriving them as scalar * G with known scalars would let anyone open a commitment two ways.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from py_arkworks_bls12381 import G1Point

from finlora.common.io import atomic_write_bytes, cache_root

ROW_SIZE = 4096
"""Values per Hyrax row: each row gets one commitment over G_0..G_{ROW_SIZE-1} plus H.

4,096 rather than the 2,048 first proposed: each row costs 80 bytes on the wire (a 48-byte commitment and a
32-byte blinding), so at Llama-3.1-8B's 4.72 M values 2,048-value rows add 184 kB per client per round, over
the 100 kB budget, and 4,096-value rows add 92 kB. The MSM work is the same (it scales with the values, not
the rows), and 1,152 rows x 4,096 columns is still a square-ish Hyrax matrix, so a later norm proof's size,
O(rows + columns), stays as small."""

DST = b"FINLORA-ZK-V1-PEDERSEN_BLS12381G1_XMD:SHA-256_SSWU_RO_"

PINNED_DIGEST = "d0c1a800c47e7c2492ba6440a1c8688112479d6b8a39e9da833b6ca1e6556437"
"""sha256 over the compressed bytes of G_0..G_{ROW_SIZE-1} then H; checked whenever they are derived."""

_GENERATOR_CACHE: dict[str, tuple[tuple[G1Point, ...], G1Point]] = {}
_EXTRA_CACHE: dict[str, list[G1Point]] = {"extra": []}
"""Generators beyond ROW_SIZE, derived on demand (the norm proof's digit rows can be wider than a value row)."""


def derive_generators() -> tuple[tuple[G1Point, ...], G1Point]:
    """Hash-to-curve every generator (~0.6 s); no caching, no check (the test calls this to re-pin)."""
    gens = tuple(G1Point.hash_to_curve(b"G" + j.to_bytes(4, "big"), DST) for j in range(ROW_SIZE))
    return gens, G1Point.hash_to_curve(b"H", DST)


def generators_digest(gens: tuple[G1Point, ...], h: G1Point) -> str:
    digest = hashlib.sha256()
    for point in (*gens, h):
        digest.update(point.to_compressed_bytes())
    return digest.hexdigest()


PINNED_XY_DIGEST = "7cf55b678c460c38b979c8cf4a2132dc7e8a5d3a8b4f6d04cb2f88bbe11c3d09"
"""sha256 over the uncompressed (x, y) bytes of G_0..G_{ROW_SIZE-1} then H: checks the on-disk copy of them."""


def generators(n: int = ROW_SIZE, cache_dir: Path | None = None) -> tuple[tuple[G1Point, ...], G1Point]:
    """(G_0..G_{n-1}, H), once per process: from ``cache_dir/generators-4096.xy`` when its sha256 is the pinned
    PINNED_XY_DIGEST (10 ms), else derived (2-5 s of hash-to-curve), checked against ``PINNED_DIGEST`` and written
    there for the next process (default: ``$FINLORA_HOME/zk``). Every prover and verifier process (a simulation's
    actors, the ServerApp, an audit) needs them, so the derivation was paid many times over."""
    if not 0 < n <= ROW_SIZE:
        raise ValueError(f"n must be in 1..{ROW_SIZE}")
    if "pinned" not in _GENERATOR_CACHE:
        _GENERATOR_CACHE["pinned"] = _load_or_derive_pinned(Path(cache_dir or cache_root() / "zk"))
    gens, h = _GENERATOR_CACHE["pinned"]
    return gens[:n], h


def _load_or_derive_pinned(cache_dir: Path) -> tuple[tuple[G1Point, ...], G1Point]:
    path = cache_dir / f"generators-{ROW_SIZE}.xy"
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if data and hashlib.sha256(data).hexdigest() == PINNED_XY_DIGEST:
        points = [G1Point.from_xy_bytes_unchecked_be(data[i * 96:(i + 1) * 96]) for i in range(ROW_SIZE + 1)]
        return tuple(points[:ROW_SIZE]), points[ROW_SIZE]
    gens, h = derive_generators()
    got = generators_digest(gens, h)
    if got != PINNED_DIGEST:
        raise RuntimeError(f"Pedersen generators digest {got} != pinned {PINNED_DIGEST}: library or code drift")
    try:
        atomic_write_bytes(path, b"".join(p.to_xy_bytes_be() for p in (*gens, h)))
    except OSError:
        pass  # a read-only cache only costs the next process the derivation
    return gens, h


WIDE_MAX = 1 << 17
"""The widest digit row a norm proof may use: 4.7 M int16 values need 2^16 (16 value rows per digit row), and
2^17 leaves room for updates up to ~9.4 M values within the proof's 768 digit rows."""
WIDE_DIGEST = "86082ce3ed7cae160bdfdff83539ed571ceea4183e1108bc357dcd6578b9bfa2"
"""sha256 over the uncompressed (x, y) bytes of G_0..G_{WIDE_MAX-1}: checks the on-disk cache, and the derivation."""
WIDE_CACHED_FROM = 1 << 14
"""Widths above this load all WIDE_MAX generators from the on-disk cache (0.1 s) instead of deriving them (~36 s)."""


def wide_generators(n: int, cache_dir: Path | None = None) -> tuple[G1Point, ...]:
    """G_0..G_{n-1} of the same hash-to-curve family: the pinned first ``ROW_SIZE``, then G_j = H2C("G" || j).

    The norm proof commits digit rows up to 32x wider than a value row so that its row commitments stay few
    (proof size). Extra generators cost ~0.3 ms each to derive; widths above WIDE_CACHED_FROM take all of them
    from ``cache_dir/generators-131072.xy`` (written after the first derivation on this machine, read only when its
    sha256 is the pinned WIDE_DIGEST, so a tampered cache is never used; default: ``$FINLORA_HOME/zk``).
    """
    if n <= ROW_SIZE:
        return generators(n)[0]
    if n > WIDE_MAX:
        raise ValueError(f"at most {WIDE_MAX} generators, asked for {n}")
    gens = generators()[0]
    extra = _EXTRA_CACHE["extra"]
    if n > WIDE_CACHED_FROM and len(extra) < WIDE_MAX - ROW_SIZE:
        _load_or_build_wide(cache_dir or cache_root() / "zk", gens, extra)
    _derive_extra(extra, n)
    return (*gens, *extra[: n - ROW_SIZE])


def _derive_extra(extra: list[G1Point], n: int) -> None:
    """Extend ``extra`` (G_ROW_SIZE, ...) by hash-to-curve until it reaches G_{n-1}."""
    for j in range(ROW_SIZE + len(extra), n):
        extra.append(G1Point.hash_to_curve(b"G" + j.to_bytes(4, "big"), DST))


def _load_or_build_wide(cache_dir: Path, gens: tuple[G1Point, ...], extra: list[G1Point]) -> None:
    path = Path(cache_dir) / f"generators-{WIDE_MAX}.xy"
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if data and hashlib.sha256(data).hexdigest() == WIDE_DIGEST:
        extra[:] = [G1Point.from_xy_bytes_unchecked_be(data[i * 96:(i + 1) * 96]) for i in range(ROW_SIZE, WIDE_MAX)]
        return
    _derive_extra(extra, WIDE_MAX)
    data = b"".join(p.to_xy_bytes_be() for p in (*gens, *extra))
    if hashlib.sha256(data).hexdigest() != WIDE_DIGEST:
        raise RuntimeError("wide Pedersen generators differ from the pinned digest: library or code drift")
    atomic_write_bytes(path, data)  # a unique temp name: two processes may build it at once


def proof_points() -> tuple[G1Point, G1Point]:
    """(S, U): the base of scalar commitments v*S + r*H and the inner-product argument's extra base.

    Both from hash-to-curve with their own labels, so nobody knows a discrete-log relation between them and
    the G_j or H.
    """
    if "proof" not in _GENERATOR_CACHE:
        _GENERATOR_CACHE["proof"] = ((G1Point.hash_to_curve(b"S", DST),), G1Point.hash_to_curve(b"U", DST))
    (s,), u = _GENERATOR_CACHE["proof"]
    return s, u
