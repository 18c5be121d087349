"""The run's append-only ledger ``runs/<run-id>/ledger.jsonl`` and the per-round aggregate files.

Line 1 (``"type": "header"``) pins the public parameters: run id, generators digest, registered public keys,
quantization, and the round-0 adapter's sha256. Then one ``"type": "round"`` line per round with everything
the audit needs and no individual update: accepted clients' commitments, signatures and weights, the
aggregate blindings, the aggregate file's and the new global adapter's sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from finlora.common.io import atomic_write_bytes, atomic_write_jsonl, read_jsonl_records
from finlora.zk.encoding import Layout
from finlora.zk.generators import PINNED_DIGEST
from finlora.zk.signing import public_key_raw
from finlora.zk.verify import Submission
from finlora.zk.commit import ROW_RULE, commitments_digest
from finlora.zk.wire import pack_blindings, pack_commitments, unpack_commitments

LEDGER_FILE = "ledger.jsonl"
VERSION = 1


def ledger_path(run_dir: Path) -> Path:
    return Path(run_dir) / LEDGER_FILE


def adapter_relpath(round_num: int) -> str:
    return f"round-{round_num}/adapter_model.safetensors"


def aggregate_relpath(round_num: int) -> str:
    return f"zk/round-{round_num}-aggregate.npy"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl_records(ledger_path(run_dir))


def seen_digests(run_dir: Path) -> set[bytes]:
    """Commitment digests of every update accepted so far: rebuilds ``verify_round``'s replay set on resume."""
    return {commitments_digest(unpack_commitments(base64.b64decode(c["commitments"])))
            for e in read_ledger(run_dir) if e.get("type") == "round" for c in e["clients"]}


def append_entry(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one line by rewriting the file via temp + rename: a crash leaves the old or the new ledger."""
    atomic_write_jsonl(ledger_path(run_dir), [*read_ledger(run_dir), entry])


def save_aggregate(run_dir: Path, round_num: int, values: np.ndarray) -> tuple[str, str]:
    """Write A (int64 .npy) beside the ledger; (path relative to the run dir, sha256 of the file)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.int64), allow_pickle=False)
    rel = aggregate_relpath(round_num)
    atomic_write_bytes(Path(run_dir) / rel, buf.getvalue())
    return rel, hashlib.sha256(buf.getvalue()).hexdigest()


def load_aggregate(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def header_entry(run_id: str, public_keys: Mapping[str, Ed25519PublicKey], round0_adapter_sha256: str,
                 norm_bound: float, frac_bits: int, bits: int, round0_adapter: str = adapter_relpath(0),
                 weighting: str = "examples", proofs: bool = False, secagg: bool = False,
                 server_optimizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The first ledger line of a run (write it once, before round 1). ``weighting``: how the aggregate weighs
    each accepted client (``examples``: its signed count; ``equal``: 1 each), which the audit re-derives;
    ``proofs``: every accepted update carries a range + norm proof, which the audit verifies;
    ``server_optimizer``: FedAdam/FedYogi's hyperparameters (``ServerOptimizer.to_json``), whose step along each
    committed average the audit recomputes (``None``: the global adapter is the committed average itself)."""
    header = {"type": "header", "version": VERSION, "run_id": run_id, "row_size": ROW_RULE, "weighting": weighting,
              "generators_digest": PINNED_DIGEST, "norm_bound": float(norm_bound), "frac_bits": int(frac_bits),
              "bits": int(bits), "proofs": bool(proofs), "secagg": bool(secagg), "adapter_file": round0_adapter,
              "adapter_sha256": round0_adapter_sha256,
              "public_keys": {str(k): public_key_raw(v).hex() for k, v in sorted(public_keys.items())}}
    if server_optimizer:
        header["server_optimizer"] = dict(server_optimizer)
    return header


def client_record(sub: Submission) -> dict[str, Any]:
    """What the ledger keeps of an accepted client: no values, no blindings; its zero-knowledge proof if any."""
    record = {"node_id": sub.node_id, "num_examples": int(sub.num_examples),
              "commitments": base64.b64encode(pack_commitments(sub.commitments)).decode(),
              "signature": bytes(sub.signature).hex()}
    if sub.proof:
        record["proof"] = base64.b64encode(bytes(sub.proof)).decode()
    return record


def record_round(run_dir: Path, round_num: int, layout: Layout, accepted: Sequence[Submission],
                 rejected: Mapping[str, str], aggregate_values: np.ndarray, aggregate_blindings: Sequence[int],
                 total_weight: int, adapter_file: str | None = None, weight_divisor: int = 1) -> dict[str, Any]:
    """Server side, after the new global adapter is saved: write the aggregate file and append the round line.

    ``adapter_file`` is relative to ``run_dir`` (default ``round-<k>/adapter_model.safetensors``).
    ``weight_divisor``: secure aggregation weighs each client by its signed count over this (their gcd).
    """
    run_dir = Path(run_dir)
    adapter_file = adapter_file or adapter_relpath(round_num)
    agg_file, agg_sha = save_aggregate(run_dir, round_num, aggregate_values)
    entry = {"type": "round", "round": int(round_num), "layout": layout.to_json(),
             "clients": [client_record(s) for s in accepted], "rejected": dict(sorted(rejected.items())),
             "total_weight": int(total_weight), "aggregate_file": agg_file, "aggregate_sha256": agg_sha,
             "aggregate_blindings": base64.b64encode(pack_blindings(aggregate_blindings)).decode(),
             "adapter_file": adapter_file, "adapter_sha256": file_sha256(run_dir / adapter_file)}
    if weight_divisor != 1:
        entry["weight_divisor"] = int(weight_divisor)
    append_entry(run_dir, entry)
    return entry


def record_kept_round(run_dir: Path, round_num: int, rejected: Mapping[str, str], reason: str,
                      adapter_file: str | None = None) -> dict[str, Any]:
    """A round that aggregated nothing (too few valid updates): its global adapter must equal the previous one,
    which the audit checks tensor by tensor; the rejected updates are listed with their reasons."""
    run_dir = Path(run_dir)
    adapter_file = adapter_file or adapter_relpath(round_num)
    entry = {"type": "round", "round": int(round_num), "kept_previous": reason, "clients": [],
             "rejected": dict(sorted(rejected.items())), "total_weight": 0, "adapter_file": adapter_file,
             "adapter_sha256": file_sha256(run_dir / adapter_file)}
    append_entry(run_dir, entry)
    return entry
