"""Re-check a finished run from its ledger, aggregate files and global adapters alone.

The institutions' public keys come from outside the ledger (``finlora zk audit RUN --keys DIR``: the keys each
institution published, or the operator's registry), because the server writes the ledger: a server that made up
a round under keys of its own must not audit OK. The ledger header's keys must equal them.

Per round: every signature against those keys, every client's zero-knowledge range + norm proof against its
commitments (runs with ``zk.proof``), sum_i n_i C_i == Com(A, R) row by row (batched), the aggregate's norm, and
global_k == apply_aggregate(global_{k-1}, A) bit for bit, plus the file hash chain.
No individual update is needed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from finlora.zk import normproof, signing
from finlora.zk.commit import ROW_RULE, commitments_digest, decode_points, opening_terms, rows_of
from finlora.zk.encoding import Layout, apply_aggregate
from finlora.zk.generators import PINNED_DIGEST
from finlora.zk.ledger import file_sha256, load_aggregate, read_ledger
from finlora.zk.server_opt import Moments, ServerOptimizer
from finlora.zk.verify import client_weights, proof_statement
from finlora.zk.wire import unpack_blindings, unpack_commitments

WEIGHTINGS = ("examples", "equal")


@dataclass(frozen=True)
class RoundVerdict:
    """One row of the audit table: round 0 is the header and starting adapter."""

    round: int
    ok: bool
    clients: int
    problems: tuple[str, ...]


def _load_adapter(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _check_header(run_dir: Path, header: dict[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> list[str]:
    problems = []
    if header.get("type") != "header":
        return ["first ledger line is not a header"]
    problems += _key_problems(header.get("public_keys", {}), keys)
    if header.get("weighting", "examples") not in WEIGHTINGS:
        problems.append(f"unknown weighting {header.get('weighting')!r} (expected one of {', '.join(WEIGHTINGS)})")
    if header.get("generators_digest") != PINNED_DIGEST or header.get("row_size") != ROW_RULE:
        problems.append("ledger was written with other Pedersen generators / row size")
    path = run_dir / header["adapter_file"]
    if not path.exists():
        problems.append(f"missing {header['adapter_file']}")
    elif file_sha256(path) != header["adapter_sha256"]:
        problems.append(f"{header['adapter_file']}: sha256 differs from the ledger")
    return problems


def _key_problems(ledger_keys: Mapping[str, str], keys: Mapping[str, Ed25519PublicKey]) -> list[str]:
    """How the ledger header's keys differ from the institutions' own (one problem per institution)."""
    trusted = {name: signing.public_key_raw(key).hex() for name, key in keys.items()}
    problems = [f"institution {name}: the ledger's key is not the one given with --keys"
                for name in sorted(set(ledger_keys) & set(trusted)) if ledger_keys[name] != trusted[name]]
    problems += [f"institution {name}: in the ledger but not in --keys"
                 for name in sorted(set(ledger_keys) - set(trusted))]
    problems += [f"institution {name}: in --keys but not in the ledger"
                 for name in sorted(set(trusted) - set(ledger_keys))]
    return problems


def _check_signatures(header: dict[str, Any], entry: dict[str, Any],
                      keys: Mapping[str, Ed25519PublicKey]) -> tuple[list[str], list[list]]:
    """Problems, and per client the decoded row commitments (empty list where they do not decode). Signatures are
    checked against the institutions' own keys, never the ledger's."""
    problems, points = [], []
    for client in entry["clients"]:
        node = client["node_id"]
        commitments = unpack_commitments(base64.b64decode(client["commitments"]))
        key = keys.get(node)
        statement = signing.update_statement(header["run_id"], entry["round"], node,
                                             commitments_digest(commitments), client["num_examples"])
        if key is None:
            problems.append(f"node {node}: no key given with --keys")
        elif not signing.verify(key, statement, bytes.fromhex(client["signature"])):
            problems.append(f"node {node}: bad signature")
        try:
            points.append(decode_points(commitments))
        except ValueError:
            problems.append(f"node {node}: commitment not in the G1 subgroup")
            points.append([])
    return problems, points


def _check_proofs(header: dict[str, Any], entry: dict[str, Any], keys: Mapping[str, Ed25519PublicKey],
                  layout: Layout, points: list[list[Any]]) -> list[str]:
    """Every accepted client's zero-knowledge proof that its committed update was in range and within the bound,
    checked against its commitments alone (a run whose header says ``proofs``; without, nothing to check).
    ``points``: each client's commitments as :func:`_check_signatures` decoded them (empty: they did not)."""
    if not header.get("proofs"):
        return []
    problems = []
    for client, rows in zip(entry["clients"], points):
        node, key = client["node_id"], keys.get(client["node_id"])
        if key is None or not rows:
            continue  # already a problem: no key given with --keys, or a commitment not in the subgroup
        if not client.get("proof"):
            problems.append(f"node {node}: no range/norm proof")
            continue
        st = proof_statement(header["run_id"], entry["round"], key, layout.size, header["bits"],
                             header["norm_bound"], header["frac_bits"])
        try:
            normproof.verify(st, rows, base64.b64decode(client["proof"]))
        except normproof.ProofError as exc:
            problems.append(f"node {node}: range/norm proof fails ({exc})")
    return problems


def _hash_chain_problems(run_dir: Path, entry: dict[str, Any], prev_path: Path, prev_sha: str) -> list[str] | None:
    """The previous adapter still has its recorded hash and this round's adapter has its own (``None``: the
    round's adapter file is missing, so nothing more can be checked)."""
    problems = []
    if file_sha256(prev_path) != prev_sha:
        problems.append(f"{prev_path.name} of the previous round differs from its ledger hash")
    new_path = run_dir / entry["adapter_file"]
    if not new_path.exists():
        return None
    if file_sha256(new_path) != entry["adapter_sha256"]:
        problems.append(f"{entry['adapter_file']}: sha256 differs from the ledger")
    return problems


def _check_kept_round(run_dir: Path, entry: dict[str, Any], prev_path: Path, prev_sha: str) -> list[str]:
    """A round that aggregated nothing: no client counted, and the global adapter unchanged."""
    problems = [] if not entry["clients"] and entry["total_weight"] == 0 else ["a kept round lists clients"]
    chain = _hash_chain_problems(run_dir, entry, prev_path, prev_sha)
    if chain is None:
        return [*problems, f"missing {entry['adapter_file']}"]
    problems += chain
    new_path = run_dir / entry["adapter_file"]
    previous, saved = _load_adapter(prev_path), _load_adapter(new_path)
    if set(previous) != set(saved) or any(previous[k].tobytes() != saved[k].tobytes() for k in saved):
        problems.append("round aggregated nothing but its global adapter differs from the previous one")
    return problems


@dataclass
class _OptimizerTrail:
    """The server optimizer the header names and its moments so far, carried from round to round by the audit
    itself (never read from the server's checkpoints)."""

    optimizer: ServerOptimizer
    moments: Moments

    def advance(self, round_num: int, previous: dict[str, np.ndarray], averaged: dict[str, np.ndarray],
                layout: Layout) -> dict[str, np.ndarray]:
        """What round ``round_num`` must have published, the optimizer's step along the committed average (on the
        keys that travel; the others copied), and the moments moved on to that round's."""
        moved = [key for key, _, _ in layout.slices()]
        stepped, self.moments = self.optimizer.step(round_num, {k: previous[k] for k in moved},
                                                    {k: averaged[k] for k in moved}, self.moments)
        return {**averaged, **stepped}


def _check_round(run_dir: Path, header: dict[str, Any], entry: dict[str, Any], prev_path: Path,
                 prev_sha: str, keys: Mapping[str, Ed25519PublicKey], trail: _OptimizerTrail | None) -> list[str]:
    if "kept_previous" in entry:
        return _check_kept_round(run_dir, entry, prev_path, prev_sha)
    problems, points = _check_signatures(header, entry, keys)
    layout = Layout.from_json(entry["layout"])
    problems += _check_proofs(header, entry, keys, layout, points)
    counts = [int(c["num_examples"]) for c in entry["clients"]]
    divisor = int(entry.get("weight_divisor", 1))
    if divisor < 1 or any(n % divisor for n in counts):
        problems.append(f"weight divisor {divisor} does not divide every signed example count")
        divisor = 1
    weights = client_weights([n // divisor for n in counts], header.get("weighting", "examples") == "equal")
    if sum(weights) != entry["total_weight"] or entry["total_weight"] <= 0:
        problems.append(f"total weight is not the sum of the clients' weights ({header.get('weighting', 'examples')})")
    agg_path = run_dir / entry["aggregate_file"]
    if not agg_path.exists() or file_sha256(agg_path) != entry["aggregate_sha256"]:
        return [*problems, f"{entry['aggregate_file']}: missing or sha256 differs from the ledger"]
    agg = load_aggregate(agg_path)
    if agg.dtype != np.int64 or agg.shape != (layout.size,):
        return [*problems, "aggregate file is not an int64 vector of the layout's size"]
    rows = rows_of(agg)
    blindings = unpack_blindings(base64.b64decode(entry["aggregate_blindings"]))
    if any(len(p) != len(rows) for p in points) or len(blindings) != len(rows):
        problems.append("row counts of commitments / aggregate blindings do not match the aggregate")
    elif not opening_terms([[(p[k], w) for p, w in zip(points, weights)] for k in range(len(rows))], rows,
                           blindings).holds():
        problems.append("sum of weighted client commitments != commitment of the aggregate")
    bound = float(header["norm_bound"]) * float(1 << header["frac_bits"]) * sum(weights)
    if float(np.linalg.norm(agg.astype(np.float64))) > bound * (1 + 1e-9):  # float: int64 squares may overflow
        problems.append("aggregate exceeds the sum of the clients' norm bounds")
    chain = _hash_chain_problems(run_dir, entry, prev_path, prev_sha)
    if chain is None:
        return [*problems, f"missing {entry['adapter_file']}"]
    problems += chain
    new_path = run_dir / entry["adapter_file"]
    previous = _load_adapter(prev_path)
    averaged = apply_aggregate(previous, agg, layout, max(1, entry["total_weight"]), header["frac_bits"])
    expected = trail.advance(int(entry["round"]), previous, averaged, layout) if trail else averaged
    saved = _load_adapter(new_path)
    if set(saved) != set(expected):
        problems.append("global adapter has other tensors than the previous one")
    bad = [k for k in sorted(expected) if k in saved and (saved[k].dtype != expected[k].dtype
                                                          or saved[k].tobytes() != expected[k].tobytes())]
    if bad:
        step = f" + {trail.optimizer.name} step along" if trail else " +"
        problems.append(f"global adapter != previous{step} aggregate in {len(bad)} tensor(s), e.g. {bad[0]}")
    return problems


def audit_run(run_dir: Path, keys: Mapping[str, Ed25519PublicKey]) -> list[RoundVerdict]:
    """A verdict for the header (round 0) and for every round line of ``run_dir/ledger.jsonl``, against the
    institutions' public ``keys`` (name -> key, from outside the ledger)."""
    run_dir = Path(run_dir)
    entries = read_ledger(run_dir)
    if not entries:
        return [RoundVerdict(0, False, 0, ("no ledger.jsonl or it is empty",))]
    header, rounds = entries[0], entries[1:]
    problems = _check_header(run_dir, header, keys)
    verdicts = [RoundVerdict(0, not problems, 0, tuple(problems))]
    if header.get("type") != "header":
        return verdicts
    prev_path, prev_sha = run_dir / header["adapter_file"], header["adapter_sha256"]
    trail = None
    if header.get("server_optimizer"):
        try:
            trail = _OptimizerTrail(ServerOptimizer.from_json(header["server_optimizer"]), Moments.zero())
        except (KeyError, TypeError, ValueError) as exc:
            return [RoundVerdict(0, False, 0, (*problems, f"unreadable server_optimizer in the header: {exc}"))]
    for expected_round, entry in enumerate(rounds, start=1):
        try:
            problems = [] if entry.get("round") == expected_round else [f"expected round {expected_round}"]
            problems += _check_round(run_dir, header, entry, prev_path, prev_sha, keys, trail)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            problems = [f"unreadable round entry: {type(exc).__name__}: {exc}"]
        verdicts.append(RoundVerdict(int(entry.get("round", expected_round)), not problems,
                                     len(entry.get("clients", [])), tuple(problems)))
        prev_path = run_dir / entry.get("adapter_file", "")
        prev_sha = entry.get("adapter_sha256", "")
    return verdicts


def format_table(verdicts: list[RoundVerdict]) -> str:
    lines = [f"{'round':>5}  {'clients':>7}  result  problems"]
    for v in verdicts:
        lines.append(f"{v.round:>5}  {v.clients:>7}  {'OK' if v.ok else 'FAIL':<6}  {'; '.join(v.problems) or '-'}")
    return "\n".join(lines)
