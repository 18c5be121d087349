"""A client's submission, how the client builds it, and the server's checks before aggregation.

The server sees the opening (values + blindings) in this layer; it checks signature, round binding,
point decoding, the integer range, the L2 bound and the opening, and aggregates only what passes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from py_arkworks_bls12381 import G1Point

from finlora.zk import signing
from finlora.zk.commit import (GROUP_ORDER, OpeningTerms, commit_rows, commitments_digest, decode_points, num_rows,
                               opening_terms, rows_of, sum_terms)
from finlora.zk import normproof
from finlora.zk.encoding import in_range, norm_within
from finlora.zk.wire import (pack_blindings, pack_commitments, unpack_blindings, unpack_commitments, values_from_wire,
                             values_to_wire)

log = logging.getLogger(__name__)

# Rejection reasons start with one of these codes, then ": " and a detail.
UNKNOWN_NODE = "unknown-node"
MALFORMED = "malformed"
DUPLICATE = "duplicate"
REPLAY = "replay"
BAD_SIGNATURE = "bad-signature"
OUT_OF_RANGE = "out-of-range"
NORM_BOUND = "norm-bound"
BAD_POINT = "bad-point"
OPENING = "opening"
BAD_PROOF = "bad-proof"

MAX_EXAMPLES = 1 << 31
"""Largest example count accepted as a weight (keeps the int64 aggregate far from overflow)."""


@dataclass(frozen=True, eq=False)
class Submission:
    """What a client sends for one round: the opening (values, blindings), the row commitments, a signature.

    ``values`` is the flat int64 vector; ``commitments`` compressed G1 points (48 bytes per row of
    ``commit.row_size(N)`` values); ``proof`` the zero-knowledge range + norm proof on the commitments (empty when
    the run asks for none).
    """

    node_id: str
    num_examples: int
    values: np.ndarray
    blindings: tuple[int, ...]
    commitments: tuple[bytes, ...]
    signature: bytes
    proof: bytes = b""

    @property
    def digest(self) -> bytes:
        return commitments_digest(self.commitments)

    def to_wire(self, bits: int) -> dict[str, Any]:
        """Flower-friendly: ``values`` an int8/int16 array; the rest bytes/int (node id comes from Flower)."""
        return {"values": values_to_wire(self.values, bits), "num_examples": int(self.num_examples),
                "commitments": pack_commitments(self.commitments), "blindings": pack_blindings(self.blindings),
                "signature": bytes(self.signature), "proof": bytes(self.proof)}

    @classmethod
    def from_wire(cls, node_id: str | int, record: Mapping[str, Any]) -> Submission:
        """Inverse of ``to_wire``; raises ValueError on bytes that do not even parse."""
        return cls(str(node_id), int(record["num_examples"]), values_from_wire(record["values"]),
                   tuple(unpack_blindings(record["blindings"])), tuple(unpack_commitments(record["commitments"])),
                   bytes(record["signature"]), bytes(record.get("proof", b"")))


def proof_statement(run_id: str, round_num: int, public_key: Ed25519PublicKey | Ed25519PrivateKey, length: int,
                    bits: int, norm_bound: float, frac_bits: int) -> normproof.Statement:
    """What an update's norm proof is about, bound to the run, the round and the institution's public key: the
    one place client, server and audit build it, so that they agree byte for byte."""
    return normproof.Statement(run_id, int(round_num), signing.public_key_raw(public_key), int(length), int(bits),
                               normproof.bound_sq(norm_bound, frac_bits))


def make_submission(values: np.ndarray, num_examples: int, key: Ed25519PrivateKey, run_id: str, round_num: int,
                    node_id: str | int, proof_params: tuple[int, float, int] | None = None,
                    progress=None) -> Submission:  # noqa: ANN001 - optional callable(str)
    """Client side: commit to the quantized update with fresh blindings and sign the statement.

    ``proof_params`` = (bits, norm_bound, frac_bits) also proves, in zero knowledge, that the committed values are
    in range and within the bound (seconds per 10^4 values; ``progress`` hears about each stage).
    """
    commitments, blindings = commit_rows(values)
    statement = signing.update_statement(run_id, round_num, node_id, commitments_digest(commitments), num_examples)
    proof = b""
    if proof_params is not None:
        bits, norm_bound, frac_bits = proof_params
        st = proof_statement(run_id, round_num, key, len(values), bits, norm_bound, frac_bits)
        proof = normproof.prove(st, values, blindings, commitments, progress=progress)
    return Submission(str(node_id), int(num_examples), np.asarray(values, dtype=np.int64), tuple(blindings),
                      tuple(commitments), signing.sign(key, statement), proof)


def signed_by(sub: Submission, key: Ed25519PublicKey, run_id: str, round_num: int, digest: bytes | None = None
              ) -> bool:
    """Whether ``sub`` carries ``key``'s signature over (run, round, its institution, commitments, count)."""
    if digest is None:
        try:
            digest = sub.digest
        except ValueError:
            return False
    statement = signing.update_statement(run_id, round_num, sub.node_id, digest, sub.num_examples)
    return signing.verify(key, statement, sub.signature)


def _statement_checks(sub: Submission, run_id: str, round_num: int, key: Ed25519PublicKey | None, rows: int,
                     seen: Collection[bytes]) -> str | None:
    """What needs neither the values nor curve arithmetic: a registered key, a plausible count, one commitment per
    row, commitments not accepted before, and the institution's signature over them."""
    if key is None:
        return f"{UNKNOWN_NODE}: no registered public key"
    if not isinstance(sub.num_examples, int) or not 0 < sub.num_examples <= MAX_EXAMPLES:
        return f"{MALFORMED}: num_examples {sub.num_examples!r} is not an int in 1..{MAX_EXAMPLES}"
    if len(sub.commitments) != rows:
        return f"{MALFORMED}: {len(sub.commitments)} commitments for {rows} rows"
    try:
        digest = sub.digest
    except ValueError as exc:
        return f"{MALFORMED}: {exc}"
    if digest in seen:
        return f"{REPLAY}: commitments already seen in an earlier round"
    if not signed_by(sub, key, run_id, round_num, digest):
        return f"{BAD_SIGNATURE}: not signed by {sub.node_id} for run {run_id!r} round {round_num}"
    return None


def _cheap_checks(sub: Submission, run_id: str, round_num: int, key: Ed25519PublicKey | None,
                  expected_size: int | None, seen: Collection[bytes]) -> str | None:
    """The reason ``sub`` (with its opening) fails a check that needs no curve arithmetic, or None."""
    if not np.issubdtype(sub.values.dtype, np.integer):
        return f"{MALFORMED}: values of dtype {sub.values.dtype}, expected integers"
    if sub.values.ndim != 1 or (expected_size is not None and sub.values.shape[0] != expected_size):
        return f"{MALFORMED}: {sub.values.shape} values, expected ({expected_size},)"
    rows = num_rows(sub.values.shape[0])
    if len(sub.blindings) != rows:
        return f"{MALFORMED}: {len(sub.blindings)} blindings for {rows} rows"
    if any(not 0 <= r < GROUP_ORDER for r in sub.blindings):
        return f"{MALFORMED}: blinding not reduced mod the group order"
    return _statement_checks(sub, run_id, round_num, key, rows, seen)


def proof_problem(sub: Submission, run_id: str, round_num: int, key: Ed25519PublicKey, norm_bound: float,
                  frac_bits: int, bits: int, length: int | None = None,
                  points: Sequence[G1Point] | None = None) -> str | None:
    """Why ``sub``'s zero-knowledge range + norm proof does not verify against its commitments, or None.
    ``length``: the update's number of values (default: the values the server received); ``points``: the
    commitments already decoded (the server decodes each update's once, for the proof and the opening)."""
    if not sub.proof:
        return f"{BAD_PROOF}: no range/norm proof (the run requires one: zk.proof)"
    length = sub.values.shape[0] if length is None else length
    st = proof_statement(run_id, round_num, key, length, bits, norm_bound, frac_bits)
    try:
        normproof.verify(st, sub.commitments if points is None else points, sub.proof)
    except normproof.ProofError as exc:
        return f"{BAD_PROOF}: {exc}"
    except Exception as exc:  # noqa: BLE001 - whatever a crafted proof triggers, it costs only its sender the round
        log.exception("zk: proof of %s raised while verifying", sub.node_id)
        return f"{BAD_PROOF}: verification failed ({type(exc).__name__}: {exc})"
    return None


def _timed_proof_problem(sub: Submission, run_id: str, round_num: int, key: Ed25519PublicKey, norm_bound: float,
                         frac_bits: int, bits: int, length: int | None,
                         proof_seconds: dict[str, float] | None,
                         points: Sequence[G1Point] | None = None) -> str | None:
    """:func:`proof_problem`, recording the verification's seconds under the node id."""
    start = time.perf_counter()
    reason = proof_problem(sub, run_id, round_num, key, norm_bound, frac_bits, bits, length, points)
    if proof_seconds is not None:
        proof_seconds[sub.node_id] = time.perf_counter() - start
    return reason


def _plaintext_checks(sub: Submission, norm_bound: float, frac_bits: int, bits: int) -> str | None:
    """The second line behind the proof: range and norm on the values the server received in the clear."""
    if not in_range(sub.values, bits):
        return f"{OUT_OF_RANGE}: a value exceeds the {bits}-bit range"
    if not norm_within(sub.values, norm_bound, frac_bits):
        norm = float(np.linalg.norm(sub.values.astype(np.float64))) / (1 << frac_bits)
        return f"{NORM_BOUND}: L2 {norm:.6g} > bound {norm_bound:.6g}"
    return None


def row_points(sub: Submission) -> list[G1Point] | str:
    """``sub``'s row commitments decoded (on the curve, in the subgroup), or the bad-point reason."""
    try:
        return decode_points(sub.commitments)
    except ValueError as exc:
        return f"{BAD_POINT}: a row commitment is not a point of the G1 subgroup ({exc})"


def client_terms(sub: Submission, points: Sequence[G1Point]) -> OpeningTerms:
    """This client's share of the batched opening check (fresh 128-bit weights per row)."""
    return opening_terms([[(p, 1)] for p in points], rows_of(sub.values), sub.blindings)


def verify_round(submissions: Sequence[Submission], run_id: str, round_num: int,
                 public_keys: Mapping[str, Ed25519PublicKey], norm_bound: float, frac_bits: int, bits: int,
                 seen_digests: Collection[bytes] = (), expected_size: int | None = None,
                 require_proof: bool = False, proof_seconds: dict[str, float] | None = None,
                 ) -> tuple[list[Submission], dict[str, str]]:
    """Server side, before aggregation: (accepted submissions in input order, node id -> rejection reason).

    ``seen_digests`` holds the commitment digests accepted in earlier rounds (the caller adds
    ``sub.digest`` of each accepted one after the round). Within the round, a commitment set submitted twice
    is accepted only for the first node that sent it (and opens it). The opening is checked for all clients at once with
    random weights per (client, row); only when that fails is each client checked alone, to name the culprits.
    Whether enough clients remain is the caller's decision. With ``require_proof`` every update's zero-knowledge
    proof is verified right after its signature (``proof_seconds`` receives each node's verification time); the
    plaintext range and norm checks stay behind it as a second line.
    """
    rejected: dict[str, str] = {}
    candidates: list[tuple[Submission, OpeningTerms]] = []
    counts = Counter(sub.node_id for sub in submissions)
    for sub in submissions:
        if counts[sub.node_id] > 1:
            rejected[sub.node_id] = f"{DUPLICATE}: node {sub.node_id} submitted {counts[sub.node_id]} updates"
            continue
        key = public_keys.get(sub.node_id)
        reason = _cheap_checks(sub, run_id, round_num, key, expected_size, seen_digests)
        points = row_points(sub) if reason is None else reason  # decoded once: for the proof and the opening
        if isinstance(points, str):
            rejected[sub.node_id] = points
            continue
        if require_proof:
            reason = _timed_proof_problem(sub, run_id, round_num, key, norm_bound, frac_bits, bits, None,
                                          proof_seconds, points)
        if reason is None:
            reason = _plaintext_checks(sub, norm_bound, frac_bits, bits)
        if reason is not None:
            rejected[sub.node_id] = reason
        else:
            candidates.append((sub, client_terms(sub, points)))
    if candidates and not sum_terms([t for _, t in candidates]).holds():
        for sub, terms in candidates:
            if not terms.holds():
                rejected[sub.node_id] = f"{OPENING}: values/blindings do not open the row commitments"
    owner: dict[bytes, str] = {}
    for sub, _ in candidates:
        if sub.node_id in rejected:
            continue
        if sub.digest in owner:  # only someone holding the other node's full opening gets here
            rejected[sub.node_id] = f"{DUPLICATE}: same commitments as node {owner[sub.digest]} in this round"
        else:
            owner[sub.digest] = sub.node_id
    for node, reason in rejected.items():
        log.warning("zk: round %d: rejected update of node %s: %s", round_num, node, reason)
    return [s for s, _ in candidates if s.node_id not in rejected], rejected


def verify_committed(submissions: Sequence[Submission], run_id: str, round_num: int,
                     public_keys: Mapping[str, Ed25519PublicKey], norm_bound: float, frac_bits: int, bits: int,
                     seen_digests: Collection[bytes], expected_size: int,
                     proof_seconds: dict[str, float] | None = None) -> tuple[list[Submission], dict[str, str]]:
    """Secure aggregation's check before masking starts: the server has no values, so each submission must carry
    a valid signature over fresh commitments of the right number of rows *and* a zero-knowledge proof that they
    commit to an in-range update within the bound. (accepted in input order, node id -> rejection reason)."""
    rejected: dict[str, str] = {}
    accepted: list[Submission] = []
    counts = Counter(sub.node_id for sub in submissions)
    owner: dict[bytes, str] = {}
    rows = num_rows(expected_size)
    for sub in submissions:
        key = public_keys.get(sub.node_id)
        if counts[sub.node_id] > 1:
            reason = f"{DUPLICATE}: node {sub.node_id} submitted {counts[sub.node_id]} updates"
        else:
            reason = _statement_checks(sub, run_id, round_num, key, rows, seen_digests)
        if reason is None and sub.digest in owner:
            reason = f"{DUPLICATE}: same commitments as node {owner[sub.digest]} in this round"
        if reason is None:
            reason = _timed_proof_problem(sub, run_id, round_num, key, norm_bound, frac_bits, bits, expected_size,
                                          proof_seconds)
        if reason is None:
            owner[sub.digest] = sub.node_id
            accepted.append(sub)
        else:
            rejected[sub.node_id] = reason
            log.warning("zk: round %d: rejected update of node %s: %s", round_num, sub.node_id, reason)
    return accepted, rejected


def aggregate(accepted: Sequence[Submission], equal_weights: bool = False) -> tuple[np.ndarray, list[int], int]:
    """(A = sum_i w_i x_i as int64, R_row = sum_i w_i r_i,row mod r per row, W = sum_i w_i).

    ``w_i`` is the signed integer example count ``n_i`` (``strategy.weighting = examples``) or 1 for every
    client (``equal``), so Com(A_row, R_row) == sum_i w_i C_i,row exactly; :func:`client_weights` says which.
    """
    if not accepted:
        raise ValueError("nothing to aggregate")
    sizes = {s.values.shape for s in accepted}
    if len(sizes) != 1:
        raise ValueError(f"accepted updates differ in size: {sizes}")
    weights = client_weights([s.num_examples for s in accepted], equal_weights)
    total = np.zeros(accepted[0].values.shape, dtype=np.int64)
    for sub, weight in zip(accepted, weights):
        total += np.int64(weight) * sub.values
    blindings = [sum(w * s.blindings[k] for s, w in zip(accepted, weights)) % GROUP_ORDER
                 for k in range(len(accepted[0].blindings))]
    return total, blindings, sum(weights)


def client_weights(num_examples: Sequence[int], equal_weights: bool) -> list[int]:
    """The FedAvg weight of each accepted client: its signed example count, or 1 each (equal weighting).

    The server and the audit both derive the weights from this rule and the signed counts; neither reads a
    weight that anyone reported.
    """
    return [1 if equal_weights else int(n) for n in num_examples]
