"""The server's side of the commitment layer: verify every update before aggregation, aggregate the committed
integers exactly, and keep the run's ledger for ``finlora zk audit``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ZkConfig

ZK_RECORD = "zk"


@dataclass
class ZkRoundResult:
    """What a verified round produced (kept until the round's adapter is saved and the ledger line written)."""

    layout: Any
    accepted: list[Any]
    rejected: dict[str, str]
    aggregate: np.ndarray
    blindings: list[int]
    total_weight: int


@dataclass
class ZkVerifier:
    """Verifies and aggregates one round of zk submissions; owns the run's ledger."""

    cfg: ZkConfig
    run_id: str
    run_dir: Path
    public_keys: dict[str, Any]
    seen_digests: set[bytes] = field(default_factory=set)

    @classmethod
    def open(cls, cfg: ZkConfig, run_id: str, run_dir: Path, keys_dir: Path) -> ZkVerifier:
        from zk.ledger import seen_digests
        from zk.signing import load_key_registry

        if not keys_dir.exists():
            raise FileNotFoundError(f"zk: key registry {keys_dir} not found (institutions' public keys)")
        # on resume, commitments accepted before the restart still count as seen (no replay across restarts)
        return cls(cfg, run_id, run_dir, load_key_registry(keys_dir), set(seen_digests(run_dir)))

    def write_header(self) -> None:
        """First ledger line: keys, parameters and the round-0 adapter's hash (call after saving round 0)."""
        from zk.ledger import adapter_relpath, append_entry, file_sha256, header_entry

        append_entry(self.run_dir, header_entry(self.run_id, self.public_keys,
                                                file_sha256(self.run_dir / adapter_relpath(0)), self.cfg.norm_bound,
                                                self.cfg.frac_bits, self.cfg.bits))

    def verify_and_aggregate(self, server_round: int, replies: list[tuple[str, Any]],
                             global_arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None,
                                                                               ZkRoundResult]:
        """``replies``: (Flower node id, RecordDict) pairs. Returns the next global arrays (``None`` if no update
        survived) and the round's result; a malformed or failing update is rejected with its reason."""
        from zk.encoding import Layout, apply_aggregate
        from zk.verify import Submission, aggregate, verify_round

        layout = Layout.from_tensors({k: np.asarray(v) for k, v in global_arrays.items()})
        subs, rejected, names = [], {}, {}
        for node_id, content in replies:
            try:
                zk_rec = content.config_records[ZK_RECORD]
                arrays = next(iter(content.array_records.values()))
                ints = {k: arrays[k].numpy() for k in arrays.keys()}
                if set(ints) != set(layout.keys):
                    raise ValueError(f"update keys differ from the global adapter's ({len(ints)} vs {layout.size})")
                record = {"values": layout.flatten(ints), "num_examples": zk_rec["num_examples"],
                          "commitments": zk_rec["commitments"], "blindings": zk_rec["blindings"],
                          "signature": zk_rec["signature"]}
                institution = str(zk_rec["institution"])
                subs.append(Submission.from_wire(institution, record))
                names[institution] = node_id
            except (KeyError, ValueError, TypeError) as exc:
                rejected[node_id] = f"malformed zk submission: {exc}"
        accepted, failed = verify_round(subs, self.run_id, server_round, self.public_keys, self.cfg.norm_bound,
                                        self.cfg.frac_bits, self.cfg.bits, self.seen_digests,
                                        expected_size=layout.size)
        rejected.update({names.get(inst, inst): f"{inst}: {why}" for inst, why in failed.items()})
        if not accepted:
            return None, ZkRoundResult(layout, [], rejected, np.zeros(0, np.int64), [], 0)
        self.seen_digests.update(s.digest for s in accepted)
        total, blindings, weight = aggregate(accepted)
        new_global = apply_aggregate({k: np.asarray(v) for k, v in global_arrays.items()}, total, layout, weight,
                                     self.cfg.frac_bits)
        return new_global, ZkRoundResult(layout, accepted, rejected, total, blindings, weight)

    def record(self, server_round: int, result: ZkRoundResult) -> None:
        """Ledger line of a round (call after its adapter file is saved: the line holds the file's hash)."""
        from zk.ledger import record_round

        record_round(self.run_dir, server_round, result.layout, result.accepted,
                     {str(k): v for k, v in result.rejected.items()}, result.aggregate, result.blindings,
                     result.total_weight)

    def record_kept(self, server_round: int, rejected: dict[str, str], reason: str) -> None:
        """Ledger line of a round that kept the previous global adapter (after its adapter file is saved)."""
        from zk.ledger import record_kept_round

        record_kept_round(self.run_dir, server_round, rejected, reason)
