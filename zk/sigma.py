"""Sigma protocols on scalar Pedersen commitments Com(v; r) = v*S + r*H, made non-interactive on a Transcript.

Three small proofs the norm proof composes: that one commitment holds the square of another's value, that a
commitment holds a bit, and that the prover knows openings of a whole batch of commitments. Each is the
textbook three-move protocol (commit, challenge, response); each response is masked by fresh randomness,
so it reveals nothing (honest-verifier zero knowledge), and two accepting transcripts with different
challenges yield the witness (special soundness).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from py_arkworks_bls12381 import G1Point, Scalar

from finlora.zk.commit import to_scalar
from finlora.zk.field import P, msm
from finlora.zk.generators import generators, proof_points
from finlora.zk.transcript import Transcript


def rand() -> int:
    return secrets.randbelow(P)


def commit_scalar(value: int, blinding: int) -> G1Point:
    s, _ = proof_points()
    return msm([s, generators(1)[1]], [value, blinding])


@dataclass(frozen=True)
class SquareProof:
    """Z holds x^2 where X holds x: Z = x*X + t*H with t = r_z - x*r_x, so prove knowledge of (x, r_x, t)."""

    a1: G1Point
    a2: G1Point
    z: int
    z1: int
    z2: int


def prove_square(tr: Transcript, big_x: G1Point, x: int, r_x: int, r_z: int) -> SquareProof:
    h = generators(1)[1]
    s, _ = proof_points()
    a, b1, b2 = rand(), rand(), rand()
    a1, a2 = msm([s, h], [a, b1]), msm([big_x, h], [a, b2])
    tr.absorb_points(b"square/a", [a1, a2])
    c = tr.challenge(b"square/c")
    t = (r_z - x * r_x) % P
    return SquareProof(a1, a2, (a + c * x) % P, (b1 + c * r_x) % P, (b2 + c * t) % P)


def verify_square(tr: Transcript, big_x: G1Point, big_z: G1Point, proof: SquareProof) -> bool:
    h = generators(1)[1]
    s, _ = proof_points()
    tr.absorb_points(b"square/a", [proof.a1, proof.a2])
    c = tr.challenge(b"square/c")
    return (msm([s, h], [proof.z, proof.z1]) == proof.a1 + big_x * _sc(c)
            and msm([big_x, h], [proof.z, proof.z2]) == proof.a2 + big_z * _sc(c))


@dataclass(frozen=True)
class BitProof:
    """C holds 0 or 1: an OR of two Schnorr proofs over H (C = r*H, or C - S = r*H), one of them simulated."""

    a0: G1Point
    a1: G1Point
    c0: int
    z0: int
    z1: int


def prove_bits(tr: Transcript, commitments: Sequence[G1Point], bits: Sequence[int],
               blindings: Sequence[int]) -> list[BitProof]:
    """One OR proof per bit; all first messages are absorbed before the one challenge they share."""
    h = generators(1)[1]
    s, _ = proof_points()
    firsts, states = [], []
    for com, bit, r in zip(commitments, bits, blindings):
        targets = [com, com - s]
        k, c_sim, z_sim = rand(), rand(), rand()
        sim = 1 - bit
        a_sim = msm([h, targets[sim]], [z_sim, -c_sim])
        a_real = h * _sc(k)
        a = [a_real, a_sim] if bit == 0 else [a_sim, a_real]
        firsts.append(a)
        states.append((bit, r, k, c_sim, z_sim))
    tr.absorb_points(b"bits/a", [p for pair in firsts for p in pair])
    c = tr.challenge(b"bits/c")
    out = []
    for (a0, a1), (bit, r, k, c_sim, z_sim) in zip(firsts, states):
        c_real = (c - c_sim) % P
        z_real = (k + c_real * r) % P
        if bit == 0:
            out.append(BitProof(a0, a1, c_real, z_real, z_sim))
        else:
            out.append(BitProof(a0, a1, c_sim, z_sim, z_real))
    return out


def verify_bits(tr: Transcript, commitments: Sequence[G1Point], proofs: Sequence[BitProof]) -> bool:
    if len(commitments) != len(proofs):
        return False
    h = generators(1)[1]
    s, _ = proof_points()
    tr.absorb_points(b"bits/a", [p for pr in proofs for p in (pr.a0, pr.a1)])
    c = tr.challenge(b"bits/c")
    for com, pr in zip(commitments, proofs):
        c1 = (c - pr.c0) % P
        if h * _sc(pr.z0) != pr.a0 + com * _sc(pr.c0):
            return False
        if h * _sc(pr.z1) != pr.a1 + (com - s) * _sc(c1):
            return False
    return True


@dataclass(frozen=True)
class OpeningProof:
    """Knowledge of openings of every commitment in a batch: Schnorr on sum_i lambda^i C_i over (S, H).

    Rewinding lambda over n values gives n combined openings, and the Vandermonde system yields each C_i's.
    """

    t: G1Point
    z1: int
    z2: int


def _powers(base: int, n: int) -> list[int]:
    out, acc = [], 1
    for _ in range(n):
        out.append(acc)
        acc = acc * base % P
    return out


def prove_openings(tr: Transcript, commitments: Sequence[G1Point], values: Sequence[int],
                   blindings: Sequence[int]) -> OpeningProof:
    h = generators(1)[1]
    s, _ = proof_points()
    lam = _powers(tr.challenge(b"open/lambda"), len(commitments))
    v = sum(l * x for l, x in zip(lam, values)) % P
    r = sum(l * x for l, x in zip(lam, blindings)) % P
    a, b = rand(), rand()
    t = msm([s, h], [a, b])
    tr.absorb_points(b"open/t", [t])
    c = tr.challenge(b"open/c")
    return OpeningProof(t, (a + c * v) % P, (b + c * r) % P)


def verify_openings(tr: Transcript, commitments: Sequence[G1Point], proof: OpeningProof) -> bool:
    h = generators(1)[1]
    s, _ = proof_points()
    lam = _powers(tr.challenge(b"open/lambda"), len(commitments))
    combined = msm(list(commitments), lam)
    tr.absorb_points(b"open/t", [proof.t])
    c = tr.challenge(b"open/c")
    return msm([s, h], [proof.z1, proof.z2]) == proof.t + combined * _sc(c)


def _sc(v: int) -> Scalar:
    return to_scalar(v)
