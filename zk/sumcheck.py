"""The prover's side of the norm proof's batched sumcheck, fast on honest (small-integer) witnesses.

The polynomial is F(z) = eq(tau, z) q(b(z)) + mu D^-1 x(z_jc)^2 over the digit table b (M*D entries, index
(row, column, digit), digit fastest; D base-4 digits per value) and the values x (M entries), with
q(b) = b(b - 1)(b - 2)(b - 3), zero exactly on the digits 0..3. Variables are bound most significant first.
Round i's message is h_i evaluated at 0..DEGREE.

Why base 4 and not bits: the verifier's cost is one multi-exponentiation as wide as a committed digit row, and the
proof's size grows with the number of rows. Base-4 digits halve the table, so at 4.7 M values the rows are half as
wide for the same number of row commitments (verify ~1.4 s instead of ~2.6 s); the price is a degree-5 round
polynomial (two more commitments per round) and one more square proof.

Why a second path: in the first rounds every table entry is still a small integer combination of the original
digits, so the round sums can be computed with exact machine arithmetic (digit patterns, weighted histograms and
Gram matrices) instead of 255-bit Python integers — the object-array rounds start only once the tables have
shrunk 2^SMALL_ROUNDS-fold. ``small_rounds=0`` is the textbook prover on object arrays; the tests check both give
the same messages, and cheating witnesses (non-digits, huge values) always take the plain path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from finlora.zk.commit import combine_rows
from finlora.zk.field import P, as_field, coeffs_from_evals, eq_table, inv, poly_eval

RADIX = 4
"""Digits take the values 0..RADIX-1."""
DIGIT_BITS = 2
DEGREE = 5
"""eq is linear in each variable and q has degree 4."""
SMALL_ROUNDS = 3
"""After i small rounds an entry depends on 2^i digits: 4^8 = 65,536 patterns at i = 3 (4^16 at i = 4 is too many)."""
_LIMB = 16
_LIMBS = 16  # 16 x 16-bit limbs cover the 255-bit field


def digit_check(b):  # noqa: ANN001, ANN201 - ints or object arrays alike
    """q(b) = b(b-1)(b-2)(b-3) = p(p+2) with p = b(b-3): two products instead of three."""
    p = b * (b - 3)
    return p * (p + 2)


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
    """For every position of the table cut into ``slots`` equal slices, the pattern of its digits across the
    slices (digit of slice s in bits 2s, 2s+1): after binding log2(slots) variables an entry depends on exactly
    this pattern."""
    sliced = beta.reshape(slots, -1)
    idx = np.zeros(sliced.shape[1], dtype=np.uint32)
    for s in range(slots):
        idx |= sliced[s].astype(np.uint32) << np.uint32(DIGIT_BITS * s)
    return idx


def _pattern_sums(slot_weights: Sequence[int]) -> np.ndarray:
    """sum_s slot_weights[s] * (digit s of v), for every pattern v of len(slot_weights) digits (mod r)."""
    n = len(slot_weights)
    patterns = np.arange(1 << (DIGIT_BITS * n), dtype=np.int64)
    out = np.zeros(len(patterns), dtype=object)
    for s, w in enumerate(slot_weights):
        if int(w):
            out = out + ((patterns >> (DIGIT_BITS * s)) & (RADIX - 1)).astype(object) * int(w)
    return out % P


def prefix_eq(tau: Sequence[int], rs: Sequence[int]) -> int:
    """eq(tau, r) over the variables bound so far."""
    acc = 1
    for t, r in zip(tau, rs):
        acc = acc * _eq_lin(t, r) % P
    return acc


def _small_round(beta: np.ndarray, x: np.ndarray, rs: list[int], tau: Sequence[int], mu: int) -> list[int]:
    """Round i = len(rs) + 1 from the original tables (digits 0..3, x int64)."""
    i = len(rs) + 1
    eqr = eq_table(rs)  # weights of the bound prefixes, most significant first
    weights = _weighted_hist(_patterns(beta, 1 << i), list(tau[i:]), 1 << (DIGIT_BITS << i))
    # slot s = 2 * prefix + half: the low half's value weighs the even slots, the high half's the odd ones
    lo = _pattern_sums([w for e in eqr for w in (int(e), 0)])
    hi = _pattern_sums([w for e in eqr for w in (0, int(e))])
    prefix = prefix_eq(tau, rs)
    # Gram matrix of x's 2^i slices: sum_p x[s, p] x[s', p], exact in int64 (|x| < 2^31, slices short enough).
    xs = x.reshape(1 << i, -1)
    gram = (xs @ xs.T).tolist()
    evals = []
    for xv in range(DEGREE + 1):
        q = digit_check((lo + (hi - lo) * xv) % P) % P
        check_sum = sum(w * int(qv) for w, qv in zip(weights, q) if w) % P
        coef = [1 - xv, xv]
        sq = 0
        for p1 in range(1 << (i - 1)):
            for p2 in range(1 << (i - 1)):
                inner = sum(coef[a] * coef[b] * gram[2 * p1 + a][2 * p2 + b] for a in (0, 1) for b in (0, 1))
                sq += int(eqr[p1]) * int(eqr[p2]) * inner
        evals.append((prefix * _eq_lin(tau[i - 1], xv) * check_sum + mu * sq) % P)
    return evals


def _fits(beta: np.ndarray, x: np.ndarray) -> bool:
    """Whether the fast path applies: entries are digits and x small enough for exact int64 Gram matrices."""
    if beta.dtype == object or x.dtype == object:
        return False
    return bool(np.all(beta < RADIX) and np.all(beta >= 0) and (x.size == 0 or int(np.abs(x).max()) < (1 << 20)))


FAST_FROM = 1 << 17
"""Digit tables at least this long take the small-integer rounds (below, their fixed costs outweigh the gain)."""


def _check_sum(b: np.ndarray, eq_hi: np.ndarray, eq_lo: np.ndarray) -> int:
    """sum_p eq(tau_rest, p) * q(b[p]) mod r, the costly step of an object round.

    eq(tau_rest, .) = eq_hi (x) eq_lo is never built: a 2^22-entry table would cost more than the sum itself."""
    p = b * (b - 3) % P
    q = (p * (p + 2)).reshape(len(eq_hi), len(eq_lo))
    return int(np.dot(np.dot(q, eq_lo) % P, eq_hi) % P)


def prove_rounds(beta: np.ndarray, x: np.ndarray, digits: int, tau: Sequence[int], mu: int, claim: int,
                 send: Callable[[list[int]], int], small_rounds: int | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[list[int], int, int, int]:
    """Run every round: ``send(evals at 0..DEGREE)`` commits the message and returns the challenge. ``claim`` is
    the sum the prover claims (mu * s); each h(1) is derived from it, as a verifier would check h(0) + h(1).

    ``small_rounds``: how many rounds take the small-integer path (default SMALL_ROUNDS on big honest tables,
    else 0). Returns (challenges, b~(r), x~(r_jc), sum_t 4^t b~(r_jc, t)).
    """
    n_vars = (len(beta) - 1).bit_length()
    vars_x = (len(x) - 1).bit_length()
    rs: list[int] = []
    if small_rounds is None:
        small_rounds = SMALL_ROUNDS if len(beta) >= FAST_FROM else 0
    small = min(small_rounds, vars_x) if _fits(beta, x) else 0
    for _ in range(small):
        message = _small_round(beta, x, rs, tau, mu)
        rs.append(send(message))
        claim = poly_eval(coeffs_from_evals(message), rs[-1])
    if small:
        # Fold the original tables through the bound prefix at once: an entry is a pattern of 2^small digits.
        eqr = eq_table(rs)
        bt = _pattern_sums(eqr.tolist())[_patterns(beta, 1 << small)]
        xt = np.array([v % P for v in combine_rows(x.reshape(1 << small, -1), [int(w) for w in eqr])],
                      dtype=object)
    else:
        bt, xt = as_field(beta), as_field(x)
    prefix = prefix_eq(tau, rs)
    inv_d = inv(digits)
    vx = int(xt[0]) if len(xt) == 1 else None
    u_table = None
    points = range(DEGREE + 1)
    for i in range(len(rs), n_vars):
        # h(X) = l(X) g(X) + xp(X): l(X) = prefix * eq(tau_i, X) is known, g(X) = sum_rest eq(tau_>i, rest)
        # q(b(X, rest)) has degree 4 and xp is the x part. g is summed at 0, 2, 3, 4 only: g(1) follows from the
        # running claim (h(0) + h(1) = claim) and g(5) from the other five (a degree-4 polynomial).
        half = len(bt) // 2
        bl, bh = bt[:half], bt[half:]
        db = bh - bl
        rest = tau[i + 1:]
        eq_hi, eq_lo = eq_table(rest[: len(rest) // 2]), eq_table(rest[len(rest) // 2:])
        if i < vars_x:
            xl, xh = xt[: len(xt) // 2], xt[len(xt) // 2:]
            dx = xh - xl
            a0, a1, a2 = (int(np.dot(u, v) % P) for u, v in ((xl, xl), (xl, dx), (dx, dx)))
            xp = [mu * (a0 + 2 * xv * a1 + xv * xv * a2) % P for xv in points]
        else:
            const = mu * inv_d % P * pow(2, n_vars - i - 1, P) % P * vx % P * vx % P
            xp = [const] * len(points)
        lin = [prefix * _eq_lin(tau[i], xv) % P for xv in points]
        g = {0: _check_sum(bl, eq_hi, eq_lo)}
        b = bh
        for xv in (2, 3, 4):
            b = b + db
            g[xv] = _check_sum(b, eq_hi, eq_lo)
        if lin[1]:
            g[1] = (claim - lin[0] * g[0] - xp[0] - xp[1]) * inv(lin[1]) % P
        else:  # tau_i = 0 or a zero prefix: the claim does not determine g(1); sum it
            g[1] = _check_sum(bh, eq_hi, eq_lo)
        g[5] = (g[0] - 5 * g[1] + 10 * g[2] - 10 * g[3] + 5 * g[4]) % P  # fifth differences of a quartic vanish
        message = [(lin[xv] * g[xv] + xp[xv]) % P for xv in points]
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
    vu = sum(pow(RADIX, t) * int(v) for t, v in enumerate(u_table)) % P
    return rs, int(bt[0]), vx, vu
