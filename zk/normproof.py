"""A zero-knowledge proof that a committed update is in range and within the L2 bound.

Statement (public): the row commitments C_0..C_{m0-1} of an integer vector x of length N (rows of n = row_size(N)
values, 1,024 or 4,096, the ragged last row padded with zeros), the range bits k, the bound B^2 in fixed-point
units, and the context the proof is bound to (run id, round, institution). Claim: the prover knows openings
(x, r_j) of the C_j with (1) every x_i in [-2^(k-1), 2^(k-1)) and (2) sum_i x_i^2 <= B^2. Nothing else about x is
revealed.

Construction (docs/zk.md has the argument, references and parameters):
- the D = k/2 base-4 digits of u = x + 2^(k-1) are committed in rows ("digit rows") of W = w * n digits;
- one batched sumcheck proves sum eq(tau, .) * b(b-1)(b-2)(b-3) = 0 over every digit (each is 0..3) together
  with sum x^2 = s for a committed s; every sumcheck message is a Pedersen commitment to its coefficients
  (Hyrax-style), so the messages reveal nothing;
- the sumcheck ends at a random point; the values there are committed, tied to the row commitments by two
  zero-knowledge dot-product arguments (one for x, one for the digits, which also gives sum_t 4^t b_t at the
  point and so ties the digits to x: u~(r) = x~(r) + 2^(k-1)), and the digit check b(b-1)(b-2)(b-3) =
  p(p+2), p = b^2 - 3b, and x^2 are computed on commitments with Sigma-protocol square proofs;
- B^2 - s is shown to lie in [0, 2^K) by K committed bits with OR proofs;
- every linear relation between committed values (sumcheck round consistency, the final check, the link,
  B^2 - s) is batched with a random challenge into one equation whose H-part the prover reveals.
Everything is non-interactive over one Transcript that starts with the parameters and the whole statement.
"""

from __future__ import annotations

import functools
import operator
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
from py_arkworks_bls12381 import G1Point, Scalar

from finlora.zk.commit import POINT_BYTES, SCALAR_BYTES, combine_rows, decode_points, num_rows, row_size
from finlora.zk.field import P, coeffs_from_evals, eq_factors, eq_table, inv, msm
from finlora.zk.generators import PINNED_DIGEST, generators, proof_points, wide_generators
from finlora.zk.ipa import DotProof, TensorTerms, dot_check_terms, prove_dot, tensor_vector
from finlora.zk.sigma import (BitProof, OpeningProof, SquareProof, commit_scalar, prove_bits, prove_openings,
                              prove_square, verify_bits, verify_openings, verify_square)
from finlora.zk.sumcheck import DEGREE, DIGIT_BITS, RADIX, prefix_eq, prove_rounds
from finlora.zk.transcript import Transcript

PROTOCOL = b"finlora-zk/norm-proof/v3"
MAX_DIGIT_ROWS = 768
"""Digit rows are widened (w doubles) until at most this many are needed: 768 * 48 bytes = 36 kB of the proof."""


EVALUATIONS = ("vb", "vx", "vu", "wb", "qb", "wx")
"""The evaluation commitments a proof carries (``NormProof`` names what each holds), in wire order."""


class ProofError(ValueError):
    """A proof that does not verify or does not parse; the message says which check failed."""


@dataclass(frozen=True)
class Statement:
    """What the proof is about and bound to. ``institution`` is the prover's public key (or another unique id)."""

    run_id: str
    round_num: int
    institution: bytes
    length: int
    bits: int
    bound_sq: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {self.bits}")
        if self.length <= 0:
            raise ValueError(f"length must be positive, got {self.length}")
        if self.bound_sq <= 0 or self.bound_sq.bit_length() > 128:
            raise ValueError(f"bound_sq must be in 1..2^128, got {self.bound_sq}")
        if self.round_num < 0:
            raise ValueError(f"round_num must be >= 0, got {self.round_num}")


def bound_sq(norm_bound: float, frac_bits: int) -> int:
    """floor((norm_bound * 2^frac_bits)^2): s <= this integer exactly when ||x||_2 <= norm_bound * 2^f."""
    return int((Fraction(norm_bound) * (1 << frac_bits)) ** 2)


@dataclass(frozen=True)
class Shape:
    """Sizes every proof for a statement has; the verifier derives them, so lengths are never read from the proof."""

    rows: int          # m0, committed value rows
    rows_padded: int   # m, a power of two
    bits: int          # k
    row_factor: int    # w: a digit row holds w * row_size digits
    d_bits: int        # K, bits of B^2 - s
    row_size: int      # n, values per row (commit.row_size of the length)

    @classmethod
    def of(cls, st: Statement) -> Shape:
        m0 = num_rows(st.length)
        m = 1 << (m0 - 1).bit_length()
        digits = st.bits // DIGIT_BITS
        w = 1
        while digits * m0 > w * MAX_DIGIT_ROWS and w < digits * m:
            w *= 2
        return cls(m0, m, st.bits, w, max(1, st.bound_sq.bit_length()), row_size(st.length))

    @property
    def digits(self) -> int:
        """D: base-4 digits per value."""
        return self.bits // DIGIT_BITS

    @property
    def width(self) -> int:
        return self.row_factor * self.row_size

    @property
    def log_rows(self) -> int:
        return self.rows_padded.bit_length() - 1

    @property
    def vars_x(self) -> int:
        return self.log_rows + self.row_size.bit_length() - 1

    @property
    def vars_b(self) -> int:
        return self.vars_x + self.digits.bit_length() - 1

    @property
    def digit_rows_total(self) -> int:
        return self.digits * self.rows_padded // self.row_factor

    @property
    def digit_rows_sent(self) -> int:
        """Digit rows holding any real value row; the rest hold padding only and are public."""
        return min(self.digit_rows_total, -(-self.rows * self.digits // self.row_factor))

    @property
    def vars_high(self) -> int:
        return self.digit_rows_total.bit_length() - 1

    def counts(self) -> tuple[int, int]:
        """(points, scalars) in a serialised proof."""
        log_w = self.width.bit_length() - 1
        points = (self.digit_rows_sent + 1 + (DEGREE + 1) * self.vars_b + len(EVALUATIONS) + 3 * 2
                  + (2 + 2 * (self.row_size.bit_length() - 1)) + (2 + 2 * log_w) + 3 * self.d_bits + 1)
        scalars = 3 * 3 + 2 * 4 + 3 * self.d_bits + 2 + 1
        return points, scalars


@dataclass(frozen=True)
class NormProof:
    """Commitments named for what they hold at the sumcheck's point: v_b = b~(r), w_b = v_b^2, q_b = p^2 with
    p = w_b - 3 v_b (so q(v_b) = q_b + 2p), v_x = x~(r_jc), w_x = v_x^2, v_u = sum_t 4^t b~(r_jc, t)."""

    digit_rows: tuple[G1Point, ...]
    c_s: G1Point
    rounds: tuple[tuple[G1Point, ...], ...]
    c_vb: G1Point
    c_vx: G1Point
    c_vu: G1Point
    c_wb: G1Point
    c_qb: G1Point
    c_wx: G1Point
    sq_b: SquareProof
    sq_p: SquareProof
    sq_x: SquareProof
    dot_x: DotProof
    dot_b: DotProof
    d_bits: tuple[G1Point, ...]
    bit_proofs: tuple[BitProof, ...]
    openings: OpeningProof
    zeta: int

    def _points(self) -> list[G1Point]:
        out = [*self.digit_rows, self.c_s, *(p for rnd in self.rounds for p in rnd), *self.evaluations(),
               *(a for sq in (self.sq_b, self.sq_p, self.sq_x) for a in (sq.a1, sq.a2))]
        for dp in (self.dot_x, self.dot_b):
            out += [dp.c_d, dp.c_delta, *dp.lefts, *dp.rights]
        out += [*self.d_bits, *(p for bp in self.bit_proofs for p in (bp.a0, bp.a1)), self.openings.t]
        return out

    def evaluations(self) -> list[G1Point]:
        """The evaluation commitments, in ``EVALUATIONS`` order (wire and transcript)."""
        return [getattr(self, f"c_{name}") for name in EVALUATIONS]

    def _scalars(self) -> list[int]:
        out = [v for sq in (self.sq_b, self.sq_p, self.sq_x) for v in (sq.z, sq.z1, sq.z2)]
        for dp in (self.dot_x, self.dot_b):
            out += [dp.zeta_z, dp.w, dp.zeta_w, dp.a_final]
        out += [v for bp in self.bit_proofs for v in (bp.c0, bp.z0, bp.z1)]
        return out + [self.openings.z1, self.openings.z2, self.zeta]

    def to_bytes(self) -> bytes:
        return (b"".join(p.to_compressed_bytes() for p in self._points())
                + b"".join(int(v).to_bytes(SCALAR_BYTES, "little") for v in self._scalars()))

    @classmethod
    def from_bytes(cls, data: bytes, shape: Shape) -> NormProof:
        """Parse with the sizes the statement implies; raises ProofError on a wrong length, a point off the curve
        or outside the subgroup, or a scalar that is not reduced mod r."""
        n_points, n_scalars = shape.counts()
        expected = n_points * POINT_BYTES + n_scalars * SCALAR_BYTES
        if len(data) != expected:
            raise ProofError(f"malformed: proof of {len(data)} bytes, this statement needs {expected}")
        try:
            pts = decode_points([data[i * POINT_BYTES:(i + 1) * POINT_BYTES] for i in range(n_points)])
        except Exception as exc:  # noqa: BLE001 - the library raises its own exception type on a bad point
            raise ProofError(f"malformed: a point does not decode ({exc})") from exc
        base = n_points * POINT_BYTES
        scs = [int.from_bytes(data[base + i * SCALAR_BYTES: base + (i + 1) * SCALAR_BYTES], "little")
               for i in range(n_scalars)]
        if any(v >= P for v in scs):
            raise ProofError("malformed: a scalar is not reduced mod the group order")
        pt, sc = iter(pts), iter(scs)

        def take(it, n):  # noqa: ANN001, ANN202 - local reader
            return tuple(next(it) for _ in range(n))

        digit_rows = take(pt, shape.digit_rows_sent)
        c_s = next(pt)
        rounds = tuple(take(pt, DEGREE + 1) for _ in range(shape.vars_b))
        evaluations = take(pt, len(EVALUATIONS))
        sq_pts = take(pt, 6)
        dots_pts = []
        for log_n in (shape.row_size.bit_length() - 1, shape.width.bit_length() - 1):
            c_d, c_delta = take(pt, 2)
            dots_pts.append((c_d, c_delta, take(pt, log_n), take(pt, log_n)))
        d_bits = take(pt, shape.d_bits)
        bit_a = take(pt, 2 * shape.d_bits)
        open_t = next(pt)
        squares = [SquareProof(sq_pts[2 * i], sq_pts[2 * i + 1], *take(sc, 3)) for i in range(3)]
        dots = [DotProof(c_d, c_delta, *take(sc, 3), lefts, rights, next(sc))
                for c_d, c_delta, lefts, rights in dots_pts]
        bit_proofs = tuple(BitProof(bit_a[2 * i], bit_a[2 * i + 1], *take(sc, 3)) for i in range(shape.d_bits))
        openings = OpeningProof(open_t, *take(sc, 2))
        return cls(digit_rows, c_s, rounds, *evaluations, *squares, dots[0], dots[1], d_bits, bit_proofs, openings,
                   next(sc))


# --------------------------------------------------------------------------------------------------------------
# Shared by prover and verifier


def _start(st: Statement, commitments: Sequence[G1Point], shape: Shape) -> Transcript:
    """Parameters, then the whole statement: nothing a challenge depends on is left out."""
    tr = Transcript(PROTOCOL)
    s, u = proof_points()
    tr.absorb(b"params/generators", bytes.fromhex(PINNED_DIGEST))
    tr.absorb_points(b"params/s-u", [s, u])
    tr.absorb_int(b"params/row-size", shape.row_size)
    tr.absorb_int(b"params/digit-row-width", shape.width)
    tr.absorb(b"statement/run", st.run_id.encode())
    tr.absorb_int(b"statement/round", st.round_num)
    tr.absorb(b"statement/institution", st.institution)
    tr.absorb_int(b"statement/length", st.length)
    tr.absorb_int(b"statement/bits", st.bits)
    tr.absorb_int(b"statement/bound-sq", st.bound_sq)
    tr.absorb_points(b"statement/commitments", commitments)
    return tr


@functools.lru_cache(maxsize=4)
def _padding_digit_row(shape: Shape) -> G1Point:
    """A digit row of padding only: every value is 0, so u = 2^(k-1) = 2 * 4^(D-1): only the top digit is set, to 2.

    Cached (a named, bounded cache): the server verifies every institution's proof of a round at one shape."""
    top = wide_generators(shape.width)[shape.digits - 1::shape.digits]
    return functools.reduce(operator.add, top) * Scalar(2)  # equal scalars: additions beat a multiexp ~20-fold


def _link_factors(shape: Shape, point: Sequence[int]) -> list[tuple[int, int]]:
    """Per-variable weights of sum_t 4^t b~(r_jc, t): eq on value-index variables, (1, 4^(2^e)) on digit var e."""
    out = []
    for g, z in enumerate(point):
        if g < shape.vars_x:
            out.append(((1 - z) % P, z % P))
        else:
            e = shape.vars_b - 1 - g
            out.append((1, pow(RADIX, 1 << e, P)))
    return out


def _value_weights(shape: Shape, rs: Sequence[int]) -> TensorTerms:
    """The columns' weights of x~(r_jc) within the combined value row: eq(r_cols, .)."""
    return [(1, eq_factors(rs[shape.log_rows:shape.vars_x]))]


def _digit_weights(shape: Shape, rs: Sequence[int], gamma: int) -> TensorTerms:
    """The weights within the combined digit row of b~(r) + gamma * sum_t 4^t b~(r_jc, t)."""
    hv = shape.vars_high
    return [(1, eq_factors(rs[hv:])), (gamma, _link_factors(shape, rs)[hv:])]


@dataclass
class _Relations:
    """Linear relations sum_i coeff_i * point_i - const * S = rho * H, batched with powers of psi."""

    items: list[tuple[list[tuple[G1Point, int]], int]]

    def point(self, psi: int) -> G1Point:
        s, _ = proof_points()
        points, coeffs, weight, const = [], [], 1, 0
        for terms, c in self.items:
            for pnt, coeff in terms:
                points.append(pnt)
                coeffs.append(coeff * weight % P)
            const = (const + c * weight) % P
            weight = weight * psi % P
        return msm([*points, s], [*coeffs, -const])


def _relations(shape: Shape, st: Statement, proof: NormProof, tau: Sequence[int], mu: int,
               rs: Sequence[int]) -> _Relations:
    items: list[tuple[list[tuple[G1Point, int]], int]] = []

    def sum01(rnd: Sequence[G1Point]) -> list[tuple[G1Point, int]]:  # h(0) + h(1) = 2 c0 + c1 + ... + cd
        return [(rnd[0], 2)] + [(c, 1) for c in rnd[1:]]

    def at(rnd: Sequence[G1Point], r: int, sign: int) -> list[tuple[G1Point, int]]:
        return [(c, sign * pow(r, e, P)) for e, c in enumerate(rnd)]

    items.append((sum01(proof.rounds[0]) + [(proof.c_s, -mu)], 0))
    for i in range(1, shape.vars_b):
        items.append((sum01(proof.rounds[i]) + at(proof.rounds[i - 1], rs[i - 1], -1), 0))
    eq_final = prefix_eq(tau, rs)
    # h_last(r) = eq(tau, r) q(v_b) + mu D^-1 w_x, with q(v_b) = q_b + 2 (w_b - 3 v_b)
    items.append((at(proof.rounds[-1], rs[-1], 1) + [(proof.c_qb, -eq_final), (proof.c_wb, -2 * eq_final),
                                                     (proof.c_vb, 6 * eq_final),
                                                     (proof.c_wx, -mu * inv(shape.digits))], 0))
    items.append(([(proof.c_vu, 1), (proof.c_vx, -1)], 1 << (st.bits - 1)))
    items.append(([(c, 1 << e) for e, c in enumerate(proof.d_bits)] + [(proof.c_s, 1)], st.bound_sq))
    return _Relations(items)


def _scalar_commitments(proof: NormProof) -> list[G1Point]:
    return [*(p for rnd in proof.rounds for p in rnd), proof.c_s, *proof.evaluations(), *proof.d_bits]


# --------------------------------------------------------------------------------------------------------------
# Prover


def _rand() -> int:
    return secrets.randbelow(P)


def _digit_table(x: np.ndarray, shape: Shape) -> np.ndarray:
    """Base-4 digits of u = x + 2^(k-1) for every padded position, index (j * n + c) * D + t (uint8 0..3)."""
    u = np.full(shape.rows_padded * shape.row_size, 1 << (shape.bits - 1), dtype=np.int64)
    u[: len(x)] += x
    out = np.empty((len(u), shape.digits), dtype=np.uint8)
    for t in range(shape.digits):
        out[:, t] = (u >> (DIGIT_BITS * t)) & (RADIX - 1)
    return out.reshape(-1)


SUBSET_CHUNK = 4
"""Digit rows are committed by table lookup: every 4 consecutive generators get their 256 digit combinations
sum_j d_j G_j once, then a row costs W/4 additions instead of ~3W/4 — many rows share the same generators."""


def _commit_digit_rows(rows: np.ndarray, gens: Sequence[G1Point], blindings: Sequence[int]) -> list[G1Point]:
    """Pedersen commitments of digit rows (any other entry: a cheating witness, committed faithfully by multiexp)."""
    h = generators(1)[1]
    digits = bool(np.all(rows < RADIX) and np.all(rows >= 0)) if rows.dtype != object else False
    if not digits or len(rows) < 64:
        return [msm([*gens, h], [*row.tolist(), blind]) for row, blind in zip(rows, blindings)]
    chunks = len(gens) // SUBSET_CHUNK
    combos = RADIX ** SUBSET_CHUNK
    # each combination m = (lowest nonzero digit at position j) + the rest: sum(m) = sum(m - 4^j) + G_j
    steps = [(m, m - (1 << (DIGIT_BITS * j)), j) for m in range(1, combos)
             for j in [next(j for j in range(SUBSET_CHUNK) if (m >> (DIGIT_BITS * j)) & (RADIX - 1))]]
    table = np.empty((chunks, combos), dtype=object)
    for ch in range(chunks):
        sums = [G1Point.identity()] * combos
        chunk_gens = gens[ch * SUBSET_CHUNK:(ch + 1) * SUBSET_CHUNK]
        for m, rest, j in steps:
            sums[m] = sums[rest] + chunk_gens[j]
        table[ch] = sums
    weights = RADIX ** np.arange(SUBSET_CHUNK, dtype=np.int64)
    out = []
    for row, blind in zip(rows, blindings):
        patterns = row.reshape(chunks, SUBSET_CHUNK).astype(np.int64) @ weights
        points = table[np.arange(chunks), patterns].tolist()  # an all-zero chunk picks the identity: harmless
        out.append(functools.reduce(operator.add, points, h * Scalar(blind)))  # plain additions beat a multiexp
    return out


def prove(st: Statement, values: Sequence[int] | np.ndarray, blindings: Sequence[int],
          commitments: Sequence[bytes] | None = None, progress=None) -> bytes:  # noqa: ANN001
    """Prove the statement for the update ``values`` committed row by row with ``blindings``.

    ``commitments`` (the row commitments already made, checked here) saves recomputing them; ``progress``
    is called with a line of text at each stage of long proofs.

    Refuses (ValueError) a vector the statement does not hold for: an honest prover never makes a bad proof.
    """
    x = np.asarray(values, dtype=np.int64).reshape(-1)
    if len(x) != st.length:
        raise ValueError(f"values: {len(x)} values, the statement is about {st.length}")
    half = 1 << (st.bits - 1)
    if len(x) and (int(x.min()) < -half or int(x.max()) >= half):
        raise ValueError(f"values: outside [-2^{st.bits - 1}, 2^{st.bits - 1})")
    s = int(np.dot(x, x))
    if s > st.bound_sq:
        raise ValueError(f"values: squared norm {s} exceeds the bound {st.bound_sq}")
    shape = Shape.of(st)
    if len(blindings) != shape.rows:
        raise ValueError(f"blindings: {len(blindings)} for {shape.rows} rows")
    return _prove(st, x.tolist(), list(blindings), _digit_table(x, shape), s, st.bound_sq - s, progress,
                  commitments).to_bytes()


def _prove(st: Statement, x: list[int], row_blindings: list[int], beta: np.ndarray, s: int, d: int,
           progress=None, commitments: Sequence[bytes] | None = None) -> NormProof:  # noqa: ANN001
    """The prover on an explicit witness. Tests call it directly with forged witnesses (a cheating prover)."""
    shape = Shape.of(st)
    report = progress or (lambda _msg: None)
    h = generators(1)[1]
    gens_x = wide_generators(shape.row_size)
    gens_b = wide_generators(shape.width)
    total = shape.rows_padded * shape.row_size
    small = all(abs(int(v)) < (1 << 62) for v in x)
    x_table = np.zeros(total, dtype=np.int64 if small else object)
    x_table[: len(x)] = [int(v) for v in x]
    x_rows = x_table.reshape(shape.rows_padded, shape.row_size)
    if commitments is None:
        row_points = [msm([*gens_x, h], [*x_rows[j].tolist(), row_blindings[j]]) for j in range(shape.rows)]
    else:
        row_points = decode_points(commitments)
    tr = _start(st, row_points, shape)

    # Digit rows: rows of padding only are public (blinding 0) and not sent.
    beta_rows = beta.reshape(shape.digit_rows_total, shape.width)
    row_blind = ([_rand() for _ in range(shape.digit_rows_sent)]
                 + [0] * (shape.digit_rows_total - shape.digit_rows_sent))
    digit_rows = _commit_digit_rows(beta_rows[: shape.digit_rows_sent], gens_b, row_blind)
    report(f"committed {shape.digit_rows_sent} digit rows")
    r_s = _rand()
    c_s = commit_scalar(s, r_s)
    tr.absorb_points(b"digit-rows", digit_rows)
    tr.absorb_points(b"c_s", [c_s])
    tau = tr.challenges(b"tau", shape.vars_b)
    mu = tr.challenge(b"mu")

    # Batched sumcheck: sum eq(tau, z) q(b(z)) + mu D^-1 x(z_jc)^2 = mu s; messages are committed.
    round_vals, round_blinds, rounds = [], [], []

    def send(evals: list[int]) -> int:
        coeffs = coeffs_from_evals(evals)
        blinds = [_rand() for _ in coeffs]
        coms = [commit_scalar(c, b) for c, b in zip(coeffs, blinds)]
        tr.absorb_points(b"round", coms)
        round_vals.append(coeffs)
        round_blinds.append(blinds)
        rounds.append(tuple(coms))
        return tr.challenge(b"r")

    rs, vb, vx, vu = prove_rounds(np.asarray(beta), x_table, shape.digits, tau, mu, mu * s % P, send,
                                  progress=report)
    pb = (vb * vb - 3 * vb) % P
    opened = {"vb": (vb, _rand()), "vx": (vx, _rand()), "vu": (vu, _rand()), "wb": (vb * vb % P, _rand()),
              "qb": (pb * pb % P, _rand()), "wx": (vx * vx % P, _rand())}
    com = {k: commit_scalar(v, b) for k, (v, b) in opened.items()}
    tr.absorb_points(b"evaluations", [com[k] for k in EVALUATIONS])
    sq_b = prove_square(tr, com["vb"], vb, opened["vb"][1], opened["wb"][1])
    rp = (opened["wb"][1] - 3 * opened["vb"][1]) % P  # C_p = C_wb - 3 C_vb holds p with this blinding
    sq_p = prove_square(tr, com["wb"] - com["vb"] * Scalar(3), pb, rp, opened["qb"][1])
    sq_x = prove_square(tr, com["vx"], vx, opened["vx"][1], opened["wx"][1])
    gamma = tr.challenge(b"gamma")

    # Dot-product arguments at the sumcheck's point.
    lr = shape.log_rows
    l_x = eq_table(rs[:lr])
    y_x = _combine(x_rows, l_x)
    yb_x = sum(int(lw) * b for lw, b in zip(l_x, row_blindings)) % P
    dot_x = prove_dot(tr, gens_x, y_x, yb_x, tensor_vector(_value_weights(shape, rs)), vx, opened["vx"][1])
    hv = shape.vars_high
    l_b = eq_table(rs[:hv])
    y_b = _combine(beta_rows, l_b)
    yb_b = sum(int(lw) * b for lw, b in zip(l_b, row_blind)) % P
    dot_b = prove_dot(tr, gens_b, y_b, yb_b, tensor_vector(_digit_weights(shape, rs, gamma)),
                      (vb + gamma * vu) % P, (opened["vb"][1] + gamma * opened["vu"][1]) % P)
    report("dot-product arguments done")

    # B^2 - s in [0, 2^K).
    d_vals = [(d >> e) & 1 if d >= 0 else ((d % P) >> e) & 1 for e in range(shape.d_bits)]
    d_blinds = [_rand() for _ in d_vals]
    d_coms = [commit_scalar(v, b) for v, b in zip(d_vals, d_blinds)]
    tr.absorb_points(b"d-bits", d_coms)
    bit_proofs = prove_bits(tr, d_coms, d_vals, d_blinds)

    partial = NormProof(tuple(digit_rows), c_s, tuple(rounds), *(com[k] for k in EVALUATIONS), sq_b, sq_p, sq_x,
                        dot_x, dot_b, tuple(d_coms), tuple(bit_proofs), OpeningProof(G1Point.identity(), 0, 0), 0)
    values = [*(c for cs in round_vals for c in cs), s, *(opened[k][0] for k in EVALUATIONS), *d_vals]
    blinds_all = [*(b for bs in round_blinds for b in bs), r_s, *(opened[k][1] for k in EVALUATIONS), *d_blinds]
    openings = prove_openings(tr, _scalar_commitments(partial), values, blinds_all)
    psi = tr.challenge(b"psi")

    # The H-part of the batched relations: the same combination applied to the blindings.
    blind_of = {id(p): b for p, b in zip(_scalar_commitments(partial), blinds_all)}
    rel = _relations(shape, st, partial, tau, mu, rs)
    zeta, weight = 0, 1
    for terms, _const in rel.items:
        zeta = (zeta + weight * sum(coeff * blind_of[id(pnt)] for pnt, coeff in terms)) % P
        weight = weight * psi % P
    report("proof complete")
    return replace(partial, openings=openings, zeta=zeta)


def _combine(rows: np.ndarray, weights: np.ndarray) -> list[int]:
    """sum_j weights_j * rows_j mod r; exact float64 limbs when the rows are machine integers (bits, honest
    values), Python integers otherwise (a cheating witness's huge values)."""
    if rows.dtype != object:
        return [v % P for v in combine_rows(rows, [int(w) for w in weights])]
    out = np.zeros(rows.shape[1], dtype=object)
    for w, row in zip(weights, rows):
        out = (out + int(w) * row) % P
    return [int(v) for v in out]


# --------------------------------------------------------------------------------------------------------------
# Verifier


def verify(st: Statement, commitments: Sequence[bytes] | Sequence[G1Point], proof_bytes: bytes) -> None:
    """Check ``proof_bytes`` for ``st`` against the row commitments (bytes, or points a caller already decoded
    with the checked decoder); raises ProofError naming the failed check."""
    shape = Shape.of(st)
    if len(commitments) != shape.rows:
        raise ProofError(f"malformed: {len(commitments)} row commitments, the statement needs {shape.rows}")
    if all(isinstance(c, G1Point) for c in commitments):
        rows = list(commitments)
    else:
        try:
            rows = decode_points(commitments)
        except Exception as exc:  # noqa: BLE001 - the library raises its own type on a bad point
            raise ProofError(f"malformed: a row commitment does not decode ({exc})") from exc
    proof = NormProof.from_bytes(bytes(proof_bytes), shape)
    tr = _start(st, rows, shape)
    tr.absorb_points(b"digit-rows", proof.digit_rows)
    tr.absorb_points(b"c_s", [proof.c_s])
    tau = tr.challenges(b"tau", shape.vars_b)
    mu = tr.challenge(b"mu")
    rs = []
    for rnd in proof.rounds:
        tr.absorb_points(b"round", rnd)
        rs.append(tr.challenge(b"r"))
    tr.absorb_points(b"evaluations", proof.evaluations())
    if not verify_square(tr, proof.c_vb, proof.c_wb, proof.sq_b):
        raise ProofError("square: the digit evaluation's square proof fails")
    if not verify_square(tr, proof.c_wb - proof.c_vb * Scalar(3), proof.c_qb, proof.sq_p):
        raise ProofError("square: the digit check's square proof fails")
    if not verify_square(tr, proof.c_vx, proof.c_wx, proof.sq_x):
        raise ProofError("square: the value evaluation's square proof fails")
    gamma = tr.challenge(b"gamma")
    # Both dot-product arguments end in one multiexp each; they are checked together (with a random weight of
    # the verifier's own) in one, with the combined rows C_y = sum_j L_j C_j folded in rather than computed.
    value_fail = "evaluation: the value rows' dot-product argument fails"
    digit_fail = "evaluation: the digit rows' dot-product argument fails"
    l_x = eq_table(rs[:shape.log_rows])
    check_x = dot_check_terms(tr, wide_generators(shape.row_size), (rows, l_x[: shape.rows].tolist()),
                              _value_weights(shape, rs), proof.c_vx, proof.dot_x)
    if check_x is None:
        raise ProofError(value_fail)
    l_b = eq_table(rs[:shape.vars_high])
    points = list(proof.digit_rows)
    weights = l_b[: shape.digit_rows_sent].tolist()
    if shape.digit_rows_total > shape.digit_rows_sent:
        points.append(_padding_digit_row(shape))
        weights.append(int(np.sum(l_b[shape.digit_rows_sent:]) % P))
    c_v = proof.c_vb + proof.c_vu * Scalar(gamma)
    check_b = dot_check_terms(tr, wide_generators(shape.width), (points, weights), _digit_weights(shape, rs, gamma),
                              c_v, proof.dot_b)
    if check_b is None:
        raise ProofError(digit_fail)
    rho = 1 + secrets.randbelow(P - 1)
    if msm([*check_x[0], *check_b[0]], [*check_x[1], *(rho * v for v in check_b[1])]) != G1Point.identity():
        raise ProofError(value_fail if msm(*check_x) != G1Point.identity() else digit_fail)
    tr.absorb_points(b"d-bits", proof.d_bits)
    if not verify_bits(tr, proof.d_bits, proof.bit_proofs):
        raise ProofError("bound: a bit of B^2 - s is not a bit")
    if not verify_openings(tr, _scalar_commitments(proof), proof.openings):
        raise ProofError("openings: the proof of knowledge of the committed values fails")
    psi = tr.challenge(b"psi")
    h = generators(1)[1]
    if _relations(shape, st, proof, tau, mu, rs).point(psi) != h * Scalar(proof.zeta):
        raise ProofError("relations: the sumcheck, link or bound equations do not hold")
