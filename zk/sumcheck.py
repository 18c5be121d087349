"""The prover's side of the norm proof's batched sumcheck, fast on honest (small-integer) witnesses.

The polynomial is F(z) = eq(tau, z) b(z)(b(z) - 1) + mu k^-1 x(z_jc)^2 over the bit table b (M*k entries, index
(row, column, bit), bit fastest) and the values x (M entries); variables are bound most significant first.
Round i's message is h_i evaluated at 0..3.

Why a second path: in the first rounds every table entry is still a small integer combination of the original
bits, so the round sums can be computed with exact machine arithmetic (bit patterns, weighted histograms and
Gram matrices) instead of 255-bit Python integers — the object-array rounds start only once the tables have
shrunk 2^SMALL_ROUNDS-fold. ``plain`` is the textbook prover on object arrays; the tests check both give the same
messages, and cheating witnesses (non-bits, huge values) always take the plain path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from finlora.zk.commit import combine_rows
from finlora.zk.field import P, as_field, coeffs_from_evals, eq_table, poly_eval

DEGREE = 3
SMALL_ROUNDS = 4
_LIMB = 16
_LIMBS = 16  # 16 x 16-bit limbs cover the 255-bit field


def _eq_lin(t: int, x: int) -> int:
    return (t * x + (1 - t) * (1 - x)) % P


def _weighted_hist(idx: np.ndarray, point: Sequence[int], values: int) -> list[int]:
    """sum over positions p with idx[p] = v of eq(point, p), for every v < ``values``, exactly (mod r).

    eq(point, .) is a tensor product, so it is split into a row part (few rows, combined in Python integers) and
    a column part cut into 16-bit limbs, which float64 bincounts sum exactly (every partial sum < 2^53).
    """
    n_vars = len(point)
    col_vars = min(n_vars, 17)
    rows = eq_table(point[: n_vars - col_vars]).tolist()
    cols = eq_table(point[n_vars - col_vars:]).tolist()
    grid = idx.reshape(len(rows), len(cols))
    limbs = [np.array([(c >> (_LIMB * l)) & 0xFFFF for c in cols], dtype=np.float64) for l in range(_LIMBS)]
    total = np.zeros(values, dtype=object)
    for row_weight, row in zip(rows, grid):
        acc = np.zeros(values, dtype=object)
        for l, limb in enumerate(limbs):
            counts = np.bincount(row, weights=limb, minlength=values)
            acc = acc + (np.rint(counts).astype(np.int64).astype(object) << (_LIMB * l))
        total = (total + acc % P * row_weight) % P
    return [int(v) for v in total]


def _patterns(beta: np.ndarray, slots: int) -> np.ndarray:
    """For every position of the table cut into ``slots`` equal slices, the pattern of its bits across the slices
    (bit s = slice s): after binding log2(slots) variables an entry depends on exactly this pattern."""
    sliced = beta.reshape(slots, -1)
    idx = np.zeros(sliced.shape[1], dtype=np.uint32)
    for s in range(slots):
        idx |= sliced[s].astype(np.uint32) << np.uint32(s)
    return idx


def _pattern_sums(slot_weights: Sequence[int]) -> np.ndarray:
    """sum_s slot_weights[s] * bit s of v, for every pattern v of len(slot_weights) bits (mod r)."""
    n = len(slot_weights)
    bits = (np.arange(1 << n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1
    return np.array([sum(int(w) for w, b in zip(slot_weights, row) if b) % P for row in bits], dtype=object)


def prefix_eq(tau: Sequence[int], rs: Sequence[int]) -> int:
    """eq(tau, r) over the variables bound so far."""
    acc = 1
    for t, r in zip(tau, rs):
        acc = acc * _eq_lin(t, r) % P
    return acc


def _small_round(beta: np.ndarray, x: np.ndarray, rs: list[int], tau: Sequence[int], mu: int, k: int
                 ) -> list[int]:
    """Round i = len(rs) + 1 from the original tables (bits 0/1, x int64)."""
    i = len(rs) + 1
    eqr = eq_table(rs)  # weights of the bound prefixes, most significant first
    weights = _weighted_hist(_patterns(beta, 1 << i), list(tau[i:]), 1 << (1 << i))
    # slot s = 2 * prefix + half: the low half's value weighs the even slots, the high half's the odd ones
    lo = _pattern_sums([w for e in eqr for w in (int(e), 0)])
    hi = _pattern_sums([w for e in eqr for w in (0, int(e))])
    prefix = prefix_eq(tau, rs)
    # Gram matrix of x's 2^i slices: sum_p x[s, p] x[s', p], exact in int64 (|x| < 2^31, slices short enough).
    xs = x.reshape(1 << i, -1)
    gram = (xs @ xs.T).tolist()
    evals = []
    for xv in range(DEGREE + 1):
        b_x = (lo + (hi - lo) * xv) % P
        q = b_x * (b_x - 1) % P
        bool_sum = sum(w * int(qv) for w, qv in zip(weights, q) if w) % P
        coef = [1 - xv, xv]
        sq = 0
        for p1 in range(1 << (i - 1)):
            for p2 in range(1 << (i - 1)):
                inner = sum(coef[a] * coef[b] * gram[2 * p1 + a][2 * p2 + b] for a in (0, 1) for b in (0, 1))
                sq += int(eqr[p1]) * int(eqr[p2]) * inner
        evals.append((prefix * _eq_lin(tau[i - 1], xv) * bool_sum + mu * sq) % P)
    return evals


def _fits(beta: np.ndarray, x: np.ndarray) -> bool:
    """Whether the fast path applies: bits are 0/1 and x small enough for exact int64 Gram matrices."""
    if beta.dtype == object or x.dtype == object:
        return False
    return bool(np.all(beta <= 1) and np.all(beta >= 0) and (x.size == 0 or int(np.abs(x).max()) < (1 << 20)))


FAST_FROM = 1 << 18
"""Bit tables at least this long take the small-integer rounds (below, their fixed costs outweigh the gain)."""


def prove_rounds(beta: np.ndarray, x: np.ndarray, k: int, tau: Sequence[int], mu: int, claim: int,
                 send: Callable[[list[int]], int], small_rounds: int | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[list[int], int, int, int]:
    """Run every round: ``send(evals at 0..3)`` commits the message and returns the challenge. ``claim`` is the
    sum the prover claims (mu * s); each h(1) is derived from it, as a verifier would check h(0) + h(1).

    ``small_rounds``: how many rounds take the small-integer path (default SMALL_ROUNDS on big honest tables,
    else 0). Returns (challenges, b~(r), x~(r_jc), sum_t 2^t b~(r_jc, t)).
    """
    n_vars = (len(beta) - 1).bit_length()
    vars_x = (len(x) - 1).bit_length()
    rs: list[int] = []
    if small_rounds is None:
        small_rounds = SMALL_ROUNDS if len(beta) >= FAST_FROM else 0
    small = min(small_rounds, vars_x) if _fits(beta, x) else 0
    for _ in range(small):
        message = _small_round(beta, x, rs, tau, mu, k)
        rs.append(send(message))
        claim = poly_eval(coeffs_from_evals(message), rs[-1])
    if small:
        # Fold the original tables through the bound prefix at once: an entry is a pattern of 2^small bits.
        eqr = eq_table(rs)
        bt = _pattern_sums(eqr.tolist())[_patterns(beta, 1 << small)]
        xt = np.array([v % P for v in combine_rows(x.reshape(1 << small, -1), [int(w) for w in eqr])],
                      dtype=object)
    else:
        bt, xt = as_field(beta), as_field(x)
    prefix = prefix_eq(tau, rs)
    inv_k = pow(k, P - 2, P)
    vx = int(xt[0]) if len(xt) == 1 else None
    u_table = None
    for i in range(len(rs), n_vars):
        # h(X) = prefix * eq(tau_i, X) * sum_rest eq(tau_>i, rest) q(b(X, rest)) + mu * (x part); h(1) follows
        # from the running claim (h(0) + h(1) = claim), so only X = 0, 2, 3 are summed, with one reduction each.
        half = len(bt) // 2
        bl, bh = bt[:half], bt[half:]
        db = bh - bl
        eq_rest = eq_table(tau[i + 1:])
        b2 = bh + db
        b3 = b2 + db
        sums = {xv: int(np.sum(b * (b - 1) * eq_rest) % P) for xv, b in ((0, bl), (2, b2), (3, b3))}
        evals = {xv: prefix * _eq_lin(tau[i], xv) % P * sums[xv] % P for xv in sums}
        if i < vars_x:
            xl, xh = xt[: len(xt) // 2], xt[len(xt) // 2:]
            dx = xh - xl
            x2 = xh + dx
            for xv, xc in ((0, xl), (2, x2), (3, x2 + dx)):
                evals[xv] = (evals[xv] + mu * int(np.sum(xc * xc) % P)) % P
        else:
            const = mu * inv_k % P * pow(2, n_vars - i - 1, P) % P * vx % P * vx % P
            evals = {xv: (e + const) % P for xv, e in evals.items()}
        evals[1] = (claim - evals[0]) % P
        message = [evals[xv] for xv in range(DEGREE + 1)]
        r = send(message)
        rs.append(r)
        claim = poly_eval(coeffs_from_evals(message), r)
        prefix = prefix * _eq_lin(tau[i], r) % P
        bt = (bl + r * db) % P
        if i < vars_x:
            xt = (xl + r * dx) % P
            if i == vars_x - 1:
                vx = int(xt[0])
                u_table = bt.copy()
        if progress and (i + 1) % 4 == 0:
            progress(f"sumcheck round {i + 1}/{n_vars}")
    vu = sum((1 << t) * int(v) for t, v in enumerate(u_table)) % P
    return rs, int(bt[0]), vx, vu
