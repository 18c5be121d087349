"""The zero-knowledge range + norm proof (zk/normproof.py): completeness, and a malicious prover's every try.

The cheating provers call ``normproof._prove`` — the prover on an explicit witness — with forged witnesses
(a value past the range with its digits wrapped or not in 0..3, a norm over the bound, the sqrt(-1) wrap-around
trick), so each attack runs the real protocol end to end and the verifier must reject it. Vectors are one or
two rows (1,024 values each at these lengths, the second ragged) so a proof takes about a second.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from py_arkworks_bls12381 import G1Point

from finlora.zk import generators as zk_generators
from finlora.zk import normproof, signing, sumcheck
from finlora.zk.commit import GROUP_ORDER, SMALL_ROW_SIZE, commit_rows, random_blindings, row_size
from finlora.zk.field import msm
from finlora.zk.generators import ROW_SIZE, generators
from finlora.zk.normproof import NormProof, ProofError, Shape, Statement, bound_sq, prove, verify
from finlora.zk.verify import BAD_PROOF, make_submission, verify_round

N_RAGGED = SMALL_ROW_SIZE + 904  # two rows of row_size(N_RAGGED) = 1,024, the last ragged
BITS = 8


def _statement(length: int, bound: int, bits: int = BITS, **kw) -> Statement:
    base = dict(run_id="run-1", round_num=3, institution=b"bank-a-public-key", length=length, bits=bits,
                bound_sq=bound)
    base.update(kw)
    return Statement(**base)


def _sqrt_minus_one() -> int:
    """i with i^2 = -1 mod r (r = 1 mod 4): a huge value whose square *lowers* a sum mod r."""
    for g in range(2, 100):
        cand = pow(g, (GROUP_ORDER - 1) // 4, GROUP_ORDER)
        if cand * cand % GROUP_ORDER == GROUP_ORDER - 1:
            return cand
    raise AssertionError("no square root of -1 found")


@pytest.fixture(scope="module")
def honest() -> dict:
    rng = np.random.default_rng(7)
    x = rng.integers(-(1 << (BITS - 1)), 1 << (BITS - 1), N_RAGGED)
    s = int(np.dot(x, x))
    st = _statement(N_RAGGED, s + 1000)
    coms, blinds = commit_rows(x)
    return {"x": x, "st": st, "coms": coms, "blinds": blinds, "proof": prove(st, x, blinds, coms)}


def _forged(st: Statement, x: list[int], blinds: list[int], beta: np.ndarray, s: int, d: int) -> bytes:
    return normproof._prove(st, x, blinds, beta, s, d).to_bytes()


def _digits_of(u: list[int], bits: int, total: int) -> np.ndarray:
    """Base-4 digit table of u (already shifted by 2^(k-1)), padding positions holding 2^(k-1), each value mod
    2^k."""
    full = [int(v) for v in u] + [1 << (bits - 1)] * (total - len(u))
    return np.array([[(v >> (2 * t)) & 3 for t in range(bits // 2)] for v in full], dtype=np.int64).reshape(-1)


def test_an_honest_proof_verifies_and_has_the_size_the_statement_implies(honest: dict) -> None:
    verify(honest["st"], honest["coms"], honest["proof"])
    points, scalars = Shape.of(honest["st"]).counts()
    assert len(honest["proof"]) == points * 48 + scalars * 32
    NormProof.from_bytes(honest["proof"], Shape.of(honest["st"]))


def test_two_proofs_of_the_same_vector_differ_and_both_verify(honest: dict) -> None:
    again = prove(honest["st"], honest["x"], honest["blinds"], honest["coms"])
    assert again != honest["proof"]
    verify(honest["st"], honest["coms"], again)


def test_all_extreme_values_with_the_norm_exactly_at_the_bound_verify_in_16_bits() -> None:
    x = np.where(np.arange(300) % 2 == 0, -(1 << 15), (1 << 15) - 1).astype(np.int64)
    s = int(np.dot(x, x))
    st = _statement(300, s, bits=16)  # norm exactly B
    coms, blinds = commit_rows(x)
    verify(st, coms, prove(st, x, blinds, coms))


@pytest.mark.parametrize("change", [dict(round_num=4), dict(run_id="run-2"), dict(institution=b"bank-b"),
                                    dict(length=N_RAGGED - 1)])
def test_a_valid_proof_replayed_for_another_round_run_institution_or_length_is_rejected(honest: dict,
                                                                                         change: dict) -> None:
    fields = dict(length=N_RAGGED, bound=honest["st"].bound_sq)
    fields.update(change)
    st = _statement(**fields)
    with pytest.raises(ProofError):
        verify(st, honest["coms"], honest["proof"])


def test_a_valid_proof_against_other_commitments_is_rejected(honest: dict) -> None:
    other, _ = commit_rows(honest["x"])  # the same vector, other blindings
    with pytest.raises(ProofError):
        verify(honest["st"], other, honest["proof"])
    swapped = [honest["coms"][1], honest["coms"][0]]
    with pytest.raises(ProofError):
        verify(honest["st"], swapped, honest["proof"])


def test_any_single_flipped_byte_is_rejected(honest: dict) -> None:
    proof = honest["proof"]
    shape = Shape.of(honest["st"])
    n_points, _ = shape.counts()
    # Every section's first and last byte (points: 48 each, then scalars: 32 each) plus spread positions.
    positions = {0, len(proof) - 1, n_points * 48, n_points * 48 - 1}
    positions |= {int(p) for p in np.linspace(1, len(proof) - 2, 36)}
    for pos in sorted(positions):
        bad = bytearray(proof)
        bad[pos] ^= 0x01 if pos % 2 else 0x80
        with pytest.raises(ProofError):
            verify(honest["st"], honest["coms"], bytes(bad))


def test_a_proof_made_for_a_larger_bound_is_rejected() -> None:
    x = np.full(200, 100, dtype=np.int64)
    s = int(np.dot(x, x))  # 2,000,000
    coms, blinds = commit_rows(x)
    loose = _statement(200, s)          # the bound the proof was made for
    tight = _statement(200, s - 1)      # the run's bound: one unit below this vector's norm
    proof = prove(loose, x, blinds, coms)
    verify(loose, coms, proof)
    with pytest.raises(ProofError):
        verify(tight, coms, proof)
    much_looser = _statement(200, 4 * s)
    with pytest.raises(ProofError):
        verify(tight, coms, prove(much_looser, x, blinds, coms))


def test_the_honest_prover_refuses_a_vector_outside_the_statement() -> None:
    x = np.zeros(100, dtype=np.int64)
    x[5] = 1 << (BITS - 1)
    coms, blinds = commit_rows(x)
    with pytest.raises(ValueError, match="outside"):
        prove(_statement(100, 10**9), x, blinds, coms)
    x[5] = 10
    with pytest.raises(ValueError, match="exceeds the bound"):
        prove(_statement(100, 99), x, blinds, coms)


@pytest.mark.parametrize("how", ["wrapped-digits", "non-digit"])
def test_a_value_one_past_the_range_is_rejected(how: str) -> None:
    half = 1 << (BITS - 1)
    x = [3, -7, half, 5] + [0] * 96       # x_2 = 2^(k-1): one past [-2^(k-1), 2^(k-1))
    coms, blinds = commit_rows(np.array(x))
    st = _statement(100, 10**9)
    total = Shape.of(st).rows_padded * Shape.of(st).row_size
    beta = _digits_of([v + half for v in x], BITS, total)
    if how == "non-digit":
        # u_2 = 2^k: no k/2-digit pattern; put a 4 in the top digit so sum_t 4^t b_t is still exactly u_2.
        d = BITS // 2
        beta[2 * d:3 * d] = 0
        beta[2 * d + d - 1] = 4
    s = sum(v * v for v in x)
    with pytest.raises(ProofError):
        verify(st, coms, _forged(st, x, blinds, beta, s, st.bound_sq - s))


@pytest.mark.parametrize("how", ["negative-slack-bits", "understated-norm"])
def test_a_norm_one_unit_above_the_bound_is_rejected(how: str) -> None:
    x = [10, -20, 30] + [0] * 97
    s = sum(v * v for v in x)
    st = _statement(100, s - 1)            # the norm is one unit above the bound
    coms, blinds = commit_rows(np.array(x))
    total = Shape.of(st).rows_padded * Shape.of(st).row_size
    beta = _digits_of([v + (1 << (BITS - 1)) for v in x], BITS, total)
    if how == "negative-slack-bits":       # B^2 - s = -1: its low K bits (all ones) are all the prover can show
        proof = _forged(st, x, blinds, beta, s, -1)
    else:                                  # claim s = B^2 so that B^2 - s = 0 decomposes
        proof = _forged(st, x, blinds, beta, st.bound_sq, 0)
    with pytest.raises(ProofError):
        verify(st, coms, proof)


def test_the_wrap_around_trick_is_rejected() -> None:
    """x_0 = sqrt(-1) mod r: its square is -1, so sum x^2 mod r is *below* the honest sum. Range catches it."""
    i = _sqrt_minus_one()
    x = [i, 100, 100, 100] + [0] * 96
    s_mod = sum(v * v for v in x) % GROUP_ORDER   # 29,999: within the bound mod r
    st = _statement(100, 40_000)
    blinds = random_blindings(1)
    total = Shape.of(st).rows_padded * Shape.of(st).row_size
    beta = _digits_of([(v + (1 << (BITS - 1))) % (1 << BITS) for v in x], BITS, total)
    forged = normproof._prove(st, x, blinds, beta, s_mod, st.bound_sq - s_mod)
    real_coms = [p.to_compressed_bytes() for p in _row_points(x, blinds)]
    with pytest.raises(ProofError):
        verify(st, real_coms, forged.to_bytes())


def _row_points(x: list[int], blinds: list[int]) -> list:
    """Row commitments of any integers (commit_rows takes int64 only; sqrt(-1) mod r is 255 bits)."""
    gens, h = generators()
    n = row_size(len(x))
    padded = x + [0] * (-len(x) % n)
    return [msm([*gens[:n], h], [*padded[j * n:(j + 1) * n], b]) for j, b in enumerate(blinds)]


def test_malformed_proofs_and_statements_get_a_clear_error(honest: dict) -> None:
    with pytest.raises(ProofError, match="malformed: proof of"):
        verify(honest["st"], honest["coms"], honest["proof"][:-1])
    unreduced = honest["proof"][:-32] + (GROUP_ORDER + 1).to_bytes(32, "little")
    with pytest.raises(ProofError, match="not reduced"):
        verify(honest["st"], honest["coms"], unreduced)
    with pytest.raises(ProofError, match="row commitments"):
        verify(honest["st"], honest["coms"][:1], honest["proof"])
    with pytest.raises(ValueError, match="bits"):
        _statement(10, 10, bits=12)


def test_bound_sq_is_the_exact_fixed_point_square() -> None:
    assert bound_sq(8.0, 12) == (8 * 4096) ** 2
    b = bound_sq(0.1, 10)
    assert Fraction(b) <= (Fraction(0.1) * 1024) ** 2 < b + 1


def test_the_cheating_harness_makes_valid_proofs_from_an_honest_witness() -> None:
    """Control for the attacks above: ``_prove`` on a true witness verifies, so each rejection is the attack's."""
    x = [10, -20, 30] + [0] * 97
    s = sum(v * v for v in x)
    st = _statement(100, s)
    coms, blinds = commit_rows(np.array(x))
    beta = _digits_of([v + (1 << (BITS - 1)) for v in x], BITS, Shape.of(st).rows_padded * Shape.of(st).row_size)
    verify(st, coms, _forged(st, x, blinds, beta, s, 0))


@pytest.mark.parametrize("bits", [8, 16])
def test_the_small_integer_sumcheck_sends_exactly_the_textbook_messages(bits: int) -> None:
    """The fast prover path (digit patterns, weighted histograms, Gram matrices) against the plain one on object
    arrays, with the same challenges: every round message and the final values must be identical."""
    rng = np.random.default_rng(bits)
    x = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), 2 * ROW_SIZE)
    digits = bits // 2
    beta = ((x[:, None] + (1 << (bits - 1))) >> (2 * np.arange(digits))) & 3
    tau = [int(v) for v in rng.integers(1, 1 << 62, (2 * ROW_SIZE * digits - 1).bit_length())]
    challenges = iter(int(v) for v in rng.integers(1, 1 << 62, 64))
    fixed = list(challenges)

    def run(small: int) -> tuple[list[list[int]], tuple]:
        sent, it = [], iter(fixed)

        def send(evals: list[int]) -> int:
            sent.append(evals)
            return next(it)
        out = sumcheck.prove_rounds(beta.reshape(-1), x, digits, tau, 12345, 12345 * int(np.dot(x, x)), send,
                                     small_rounds=small)
        return sent, out
    fast, plain = run(sumcheck.SMALL_ROUNDS), run(0)
    assert fast == plain


def test_wide_generators_come_from_a_digest_checked_cache_and_a_tampered_one_is_rebuilt(tmp_path, monkeypatch):
    """Mechanics at a small width (the real one, 2^17 generators, takes ~36 s to derive): the first call derives
    and writes the cache, the next process-equivalent loads it, and a flipped byte makes it derive again."""
    g = zk_generators
    width = 2 * ROW_SIZE
    derived = [G1Point.hash_to_curve(b"G" + j.to_bytes(4, "big"), g.DST) for j in range(ROW_SIZE, width)]
    digest = hashlib.sha256(b"".join(p.to_xy_bytes_be() for p in (*g.generators()[0], *derived))).hexdigest()
    monkeypatch.setattr(g, "WIDE_MAX", width)
    monkeypatch.setattr(g, "WIDE_CACHED_FROM", ROW_SIZE)
    monkeypatch.setattr(g, "WIDE_DIGEST", digest)
    monkeypatch.setitem(g._EXTRA_CACHE, "extra", [])
    assert list(g.wide_generators(width, tmp_path)[ROW_SIZE:]) == derived
    cache = tmp_path / f"generators-{width}.xy"
    assert cache.is_file()
    monkeypatch.setitem(g._EXTRA_CACHE, "extra", [])
    assert list(g.wide_generators(width, tmp_path)[ROW_SIZE:]) == derived
    data = bytearray(cache.read_bytes())
    data[-5] ^= 1
    cache.write_bytes(bytes(data))
    monkeypatch.setitem(g._EXTRA_CACHE, "extra", [])
    assert list(g.wide_generators(width, tmp_path)[ROW_SIZE:]) == derived
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == digest


def test_the_pinned_generators_come_from_a_digest_checked_cache_and_a_tampered_one_is_rebuilt(tmp_path, monkeypatch):
    """Each process derives G_0..G_4095, H once (seconds) and leaves them on disk; the next loads them only when
    they hash to the pinned digest, so a changed point is never used: it derives them again and rewrites the file."""
    g = zk_generators
    expected = g.generators()
    monkeypatch.delitem(g._GENERATOR_CACHE, "pinned")
    assert g.generators(cache_dir=tmp_path) == expected  # derived (nothing on disk), then written
    cache = tmp_path / f"generators-{ROW_SIZE}.xy"
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == g.PINNED_XY_DIGEST
    monkeypatch.delitem(g._GENERATOR_CACHE, "pinned")
    monkeypatch.setattr(g, "derive_generators", lambda: pytest.fail("derived although the cache is good"))
    assert g.generators(cache_dir=tmp_path) == expected  # loaded
    monkeypatch.undo()
    data = bytearray(cache.read_bytes())
    data[100] ^= 1  # another point (or not a point at all)
    cache.write_bytes(bytes(data))
    monkeypatch.delitem(g._GENERATOR_CACHE, "pinned")
    assert g.generators(cache_dir=tmp_path) == expected
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == g.PINNED_XY_DIGEST


def test_the_server_rejects_a_missing_a_foreign_and_a_garbage_proof_and_keeps_the_honest_update() -> None:
    """verify_round with require_proof, as the server runs it: each bad proof costs only its sender the round."""
    keys = {f"inst-{i}": signing.generate_key() for i in range(4)}
    public = {name: key.public_key() for name, key in keys.items()}
    rng = np.random.default_rng(5)
    params = (8, 1.0, 6)  # bits, norm bound, fraction bits
    subs = [make_submission(rng.integers(-3, 4, 300), 10, keys[f"inst-{i}"], "run", 2, f"inst-{i}", params)
            for i in range(4)]
    subs[1] = replace(subs[1], proof=b"")
    subs[2] = replace(subs[2], proof=subs[0].proof)            # someone else's valid proof
    subs[3] = replace(subs[3], proof=bytes(len(subs[3].proof)))  # all zero bytes: not even points
    seconds: dict[str, float] = {}
    accepted, rejected = verify_round(subs, "run", 2, public, 1.0, 6, 8, require_proof=True, proof_seconds=seconds)
    assert [s.node_id for s in accepted] == ["inst-0"]
    assert set(rejected) == {"inst-1", "inst-2", "inst-3"} and all(r.startswith(BAD_PROOF) for r in rejected.values())
    assert "no range/norm proof" in rejected["inst-1"] and "malformed" in rejected["inst-3"]
    assert set(seconds) == {"inst-0", "inst-1", "inst-2", "inst-3"}
