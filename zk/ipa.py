"""Zero-knowledge proof that a committed vector's inner product with a public vector is a committed value.

Statement: C_y = <y, G> + b_y*H and C_v = v*S + b_v*H with <y, a> = v, for a public vector a.
Construction (Hyrax's proof-of-dot-product, Wahby et al. S&P 2018, Appendix A, compressed with the
Bulletproofs inner-product argument, Bünz et al. S&P 2018, Protocol 2):
1. the prover commits a random mask vector d and its product <d, a>; the verifier challenges c;
2. z = c*y + d is now uniform and independent of y, so it may be revealed — but not all W entries of it
   (that would be W*32 bytes), so the prover reveals only the blindings and the value w = <z, a>, and then
   proves knowledge of z with <z, G> = c*C_y + C_d - zeta_z*H and <z, a> = w by log2(W) halving rounds.
The halving rounds are not zero knowledge on their own; they need not be, because z is already masked.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from py_arkworks_bls12381 import G1Point, Scalar

from finlora.zk.field import P, dot, inv, msm, tensor
from finlora.zk.generators import generators, proof_points
from finlora.zk.transcript import Transcript


TensorTerms = Sequence[tuple[int, Sequence[tuple[int, int]]]]
"""A public vector written as sum_k coeff_k * tensor(factors_k) (every vector the norm proof opens against is one
or two such terms). The verifier needs only its inner product with the challenge vector s, which is
sum_k coeff_k * prod_j (f0_j e_j^-1 + f1_j e_j): O(log n) instead of building and multiplying n entries."""


def tensor_vector(terms: TensorTerms) -> list[int]:
    """The public vector in full (the prover folds it round by round)."""
    out = np.zeros(1 << len(terms[0][1]), dtype=object)
    for coeff, factors in terms:
        out = (out + tensor(factors) * (coeff % P)) % P
    return out.tolist()


def _inner_with_challenges(terms: TensorTerms, es: Sequence[int]) -> int:
    total = 0
    for coeff, factors in terms:
        acc = coeff % P
        for (f0, f1), e in zip(factors, es):
            acc = acc * (f0 * inv(e) + f1 * e) % P
        total += acc
    return total % P


_SWITCH = 32
"""Rounds run as multiexps over the original generators until at most n/32 folded generators remain: one
big multiexp costs ~20 us a point, while folding costs ~470 us a point (two full scalar multiplications)."""


@dataclass(frozen=True)
class DotProof:
    c_d: G1Point
    c_delta: G1Point
    zeta_z: int
    w: int
    zeta_w: int
    lefts: tuple[G1Point, ...]
    rights: tuple[G1Point, ...]
    a_final: int


def _fold_points(left: Sequence[G1Point], right: Sequence[G1Point], lo: int, hi: int) -> list[G1Point]:
    """lo*left_i + hi*right_i for every i (a 2-point multiexp each: cheaper than two scalar multiplications)."""
    s_lo, s_hi = Scalar(lo), Scalar(hi)
    return [G1Point.multiexp_unchecked([a, b], [s_lo, s_hi]) for a, b in zip(left, right)]


def _fold(left: np.ndarray, right: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return (left * lo + right * hi) % P


def prove_dot(tr: Transcript, gens: Sequence[G1Point], y: Sequence[int], y_blind: int, a: Sequence[int],
              v: int, v_blind: int) -> DotProof:
    """Prove <y, a> = v for C_y = <y, gens> + y_blind*H and C_v = v*S + v_blind*H (both already absorbed)."""
    n = len(gens)
    if n & (n - 1) or len(y) != n or len(a) != n:
        raise ValueError("vectors must have the generators' power-of-two length")
    h = generators(1)[1]
    s, u = proof_points()
    d = [secrets.randbelow(P) for _ in range(n)]
    r_d, r_delta = secrets.randbelow(P), secrets.randbelow(P)
    delta = dot(d, a)
    c_d = msm([*gens, h], [*d, r_d])
    c_delta = msm([s, h], [delta, r_delta])
    tr.absorb_points(b"dot/mask", [c_d, c_delta])
    c = tr.challenge(b"dot/c")
    z = (np.array([int(t) for t in y], dtype=object) * c + np.array(d, dtype=object)) % P
    zeta_z = (c * y_blind + r_d) % P
    w = (c * v + delta) % P
    zeta_w = (c * v_blind + r_delta) % P
    for label, value in ((b"dot/zeta_z", zeta_z), (b"dot/w", w), (b"dot/zeta_w", zeta_w)):
        tr.absorb_scalar(label, value)
    u_x = u * Scalar(tr.challenge(b"dot/u"))
    g = list(gens)
    coef = np.ones(n, dtype=object)  # current generator j = sum of coef_q G_q over originals q = j mod len(z)
    av = np.array([int(t) % P for t in a], dtype=object)
    lefts, rights = [], []
    while len(z) > 1:
        half = len(z) // 2
        z_l, z_r, a_l, a_r = z[:half], z[half:], av[:half], av[half:]
        if coef is not None:
            # Early rounds: one multiexp over the original generators instead of folding n points one by one.
            blocks = coef.reshape(-1, len(z))
            l_scalars = (blocks[:, half:] * z_l % P).reshape(-1)
            r_scalars = (blocks[:, :half] * z_r % P).reshape(-1)
            orig = np.arange(n).reshape(-1, len(z))
            big_l = msm([*(gens[q] for q in orig[:, half:].reshape(-1)), u_x], [*l_scalars, dot(z_l, a_r)])
            big_r = msm([*(gens[q] for q in orig[:, :half].reshape(-1)), u_x], [*r_scalars, dot(z_r, a_l)])
        else:
            big_l = msm([*g[half:], u_x], [*z_l, dot(z_l, a_r)])
            big_r = msm([*g[:half], u_x], [*z_r, dot(z_r, a_l)])
        tr.absorb_points(b"dot/lr", [big_l, big_r])
        e = tr.challenge(b"dot/e")
        e_inv = inv(e)
        lefts.append(big_l)
        rights.append(big_r)
        z = _fold(z_l, z_r, e, e_inv)
        av = _fold(a_l, a_r, e_inv, e)
        if coef is not None:
            blocks = coef.reshape(-1, 2 * half)
            blocks[:, :half] = blocks[:, :half] * e_inv % P
            blocks[:, half:] = blocks[:, half:] * e % P
            coef = blocks.reshape(-1)
            if half * _SWITCH <= n or half == 1:
                # Few generators left: build them once (half small multiexps), then fold them directly.
                cols = coef.reshape(-1, half)
                g = [msm([gens[q] for q in range(j, n, half)], cols[:, j].tolist()) for j in range(half)]
                coef = None
        else:
            g = _fold_points(g[:half], g[half:], e_inv, e)
    tr.absorb_scalar(b"dot/final", int(z[0]))
    return DotProof(c_d, c_delta, zeta_z, w, zeta_w, tuple(lefts), tuple(rights), int(z[0]))


def dot_check_terms(tr: Transcript, gens: Sequence[G1Point], c_y: tuple[Sequence[G1Point], Sequence[int]],
                    a: TensorTerms, c_v: G1Point, proof: DotProof) -> tuple[list[G1Point], list[int]] | None:
    """The verifier's side, in the same transcript order, up to its final equation: returned as (points, scalars)
    whose multiexp (over len(gens) + O(log n) points) must be the identity, so that a caller checks several
    arguments in one multiexp with random weights; None when an earlier check already failed. ``c_y`` is given as
    the terms it is a combination of (points, weights): they join the final multiexp instead of costing one of
    their own."""
    n = len(gens)
    rounds = n.bit_length() - 1
    if (n & (n - 1) or any(len(factors) != rounds for _, factors in a) or len(proof.lefts) != rounds
            or len(proof.rights) != rounds):
        return None
    h = generators(1)[1]
    s, u = proof_points()
    tr.absorb_points(b"dot/mask", [proof.c_d, proof.c_delta])
    c = tr.challenge(b"dot/c")
    for label, value in ((b"dot/zeta_z", proof.zeta_z), (b"dot/w", proof.w), (b"dot/zeta_w", proof.zeta_w)):
        tr.absorb_scalar(label, value)
    if msm([c_v, proof.c_delta, s, h], [c, 1, -proof.w, -proof.zeta_w]) != G1Point.identity():
        return None
    u_scalar = tr.challenge(b"dot/u")
    es = []
    for big_l, big_r in zip(proof.lefts, proof.rights):
        tr.absorb_points(b"dot/lr", [big_l, big_r])
        es.append(tr.challenge(b"dot/e"))
    tr.absorb_scalar(b"dot/final", proof.a_final)
    # s_q = prod over rounds of e (if q's bit for that round is 1) or e^-1 (if 0), most significant bit first;
    # the generators' scalars are s_q * a_final, so the table starts from a_final instead of 1.
    svec = np.array([proof.a_final], dtype=object)
    for e in es:
        svec = np.stack([svec * inv(e) % P, svec * e % P], axis=1).reshape(-1)
    a_final = _inner_with_challenges(a, es)
    y_points, y_weights = c_y
    lhs_points = [*gens, u, *y_points, proof.c_d, h, *proof.lefts, *proof.rights]
    lhs_scalars = [*svec.tolist(), (proof.a_final * a_final - proof.w) % P * u_scalar % P,
                   *(-c * w % P for w in y_weights), -1, proof.zeta_z,
                   *(-(e * e) for e in es), *(-inv(e * e % P) for e in es)]
    return lhs_points, lhs_scalars
