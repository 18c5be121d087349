"""The server's side of the commitment layer: verify every update before aggregation, aggregate the committed
integers exactly, and keep the run's ledger for ``finlora zk audit``.

**Who is who.** A reply names the institution whose key signed it; Flower names the node that sent it. The two are
bound before any signature is checked, so that a node cannot get another institution's honest update dropped by
claiming its name: with a registry (``zk.registry``, written by ``finlora server`` from the SuperNode keys it
registered: institution -> SuperNode id), a reply whose claimed institution is not its node's is rejected and only
its sender is blamed. Without one (simulation, where the researcher runs every institution) an institution is bound
to the first node whose update under that name carries a valid signature, for the rest of the run; a node
claiming a bound name, or several names, is rejected alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finlora.common.config import FinloraConfig, ZkConfig
from finlora.zk import codec
from finlora.zk.encoding import Layout, apply_aggregate
from finlora.zk.ledger import (append_entry, file_sha256, header_entry, record_kept_round,
                               record_round, seen_digests)
from finlora.zk.server_opt import ServerOptimizer
from finlora.zk.signing import load_key_registry
from finlora.zk.verify import aggregate, signed_by, verify_round

IMPERSONATION = "impersonation"
"""Rejection code of a reply that claims an institution its node is not bound to."""


def load_node_registry(path: Path) -> dict[str, str | None]:
    """Institution name -> SuperNode id (as a string; ``None`` where the id was not recorded), from
    ``finlora server``'s ``institutions.json`` ({name: {"node_id": int | null, "key_sha256": ...}})."""
    import json

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"zk.registry {path}: not a readable JSON file: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, dict) and "node_id" in v for v in raw.values()):
        raise ValueError(f"zk.registry {path}: expected a JSON object institution -> {{\"node_id\": ...}}")
    return {str(name): None if v["node_id"] is None else str(int(v["node_id"])) for name, v in raw.items()}


@dataclass
class ZkRoundResult:
    """What a verified round produced (kept until the round's adapter is saved and the ledger line written)."""

    layout: Any
    accepted: list[Any]
    rejected: dict[str, str]
    aggregate: np.ndarray
    blindings: list[int]
    total_weight: int
    proof_seconds: dict[str, float] = field(default_factory=dict)
    """Node id -> seconds the server took to verify that node's zero-knowledge proof (``zk.proof``)."""
    weight_divisor: int = 1
    """Secure aggregation: the signed example counts were divided by this (their gcd) to give the weights."""
    kept_reason: str = ""
    """Why the round aggregated nothing although updates verified (secure aggregation dropped it)."""


@dataclass
class ZkVerifier:
    """Verifies and aggregates each round's zk submissions: keeps which institution is which node and which
    commitments were already accepted (no replay). Owned by the strategy wrapper; the ledger is the recorder's
    (:class:`ZkLedger`)."""

    cfg: ZkConfig
    run_id: str
    """What every signature is over: the run's name and the deployment's random nonce (``zk.run-nonce``)."""
    run_dir: Path
    public_keys: dict[str, Any]
    seen_digests: set[bytes] = field(default_factory=set)
    equal_weights: bool = False
    """``strategy.weighting = equal``: every accepted update weighs 1 (else its signed example count)."""
    node_of: dict[str, str | None] = field(default_factory=dict)
    """Institution -> the Flower node id it is bound to (from ``zk.registry``, fixed before the run: an institution
    not in it is never bound; without one, bound on the first valid signature)."""

    @classmethod
    def for_run(cls, cfg: FinloraConfig, flower_run_id: int, run_dir: Path) -> ZkVerifier | None:
        """The verifier of a run with ``zk.enabled`` (``None`` without): the institutions' public keys from
        ``zk.keys-dir``, else the run directory's ``keys`` (a simulation's), weights as ``strategy.weighting``."""
        if not cfg.zk.enabled:
            return None
        keys_dir = Path(cfg.zk.keys_dir) if cfg.zk.keys_dir else run_dir / "keys"
        return cls.open(cfg.zk, cfg.signed_run_id(flower_run_id), run_dir, keys_dir,
                        equal_weights=cfg.strategy.weighting == "equal")

    @classmethod
    def open(cls, cfg: ZkConfig, run_id: str, run_dir: Path, keys_dir: Path, equal_weights: bool = False
             ) -> ZkVerifier:
        if not keys_dir.exists():
            raise FileNotFoundError(f"zk: key registry {keys_dir} not found (institutions' public keys)")
        registry = load_node_registry(Path(cfg.registry)) if cfg.registry else {}
        # on resume, commitments accepted before the restart still count as seen (no replay across restarts)
        return cls(cfg, run_id, run_dir, load_key_registry(keys_dir), set(seen_digests(run_dir)), equal_weights,
                   registry)

    def _identity_problem(self, node_id: str, institution: str, sub: Any, server_round: int,
                          claims: dict[str, list[str]]) -> str | None:
        """Why ``node_id`` may not speak for ``institution`` this round (``None``: it may, pending its signature)."""
        bound_node = self.node_of.get(institution)
        bound_name = next((name for name, node in self.node_of.items() if node == node_id), None)
        if bound_name is not None and bound_name != institution:
            return f"{IMPERSONATION}: node {node_id} is {bound_name}, but its reply claims to be {institution}"
        if bound_node is not None and bound_node != node_id:
            return f"{IMPERSONATION}: {institution} is node {bound_node}, but node {node_id} claims to be it"
        if self.cfg.registry and institution not in self.node_of:
            return f"{IMPERSONATION}: {institution} is not in the run's registry ({self.cfg.registry})"
        key = self.public_keys.get(institution)
        if bound_node is None and len(claims[institution]) > 1 and (
                key is None or not signed_by(sub, key, self.run_id, server_round)):
            return f"{IMPERSONATION}: node {node_id} claims to be {institution} without its signature"
        return None

    def bind_identities(self, server_round: int, parsed: list[tuple[str, str, Any]], rejected: dict[str, str]
                        ) -> tuple[list[Any], dict[str, str]]:
        """Bind node <-> institution before verifying anything else: an impostor is rejected alone (into
        ``rejected``) and its victim goes on. ``parsed``: (node id, claimed institution, submission). Returns the
        submissions that may go on and institution -> node id."""
        claims: dict[str, list[str]] = {}
        for node_id, institution, _ in parsed:
            claims.setdefault(institution, []).append(node_id)
        subs, names = [], {}
        for node_id, institution, sub in parsed:
            problem = self._identity_problem(node_id, institution, sub, server_round, claims)
            if problem is not None:
                rejected[node_id] = problem
            else:
                subs.append(sub)
                names[institution] = node_id
        return subs, names

    def verify_and_aggregate(self, server_round: int, replies: list[tuple[str, Any]],
                             global_arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None,
                                                                               ZkRoundResult]:
        """``replies``: (Flower node id, RecordDict) pairs. Returns the next global arrays (``None`` if no update
        survived) and the round's result; a malformed or failing update is rejected with its reason."""
        layout = Layout.from_tensors({k: np.asarray(v) for k, v in global_arrays.items()})
        parsed: list[tuple[str, str, Any]] = []
        rejected: dict[str, str] = {}
        for node_id, content in replies:
            try:
                arrays = next(iter(content.array_records.values()))
                institution, sub = codec.decode({k: arrays[k].numpy() for k in arrays.keys()},
                                                dict(content.config_records[codec.ZK_RECORD]), layout)
                parsed.append((str(node_id), institution, sub))
            except (KeyError, ValueError, TypeError) as exc:
                rejected[node_id] = f"malformed zk submission: {exc}"
        subs, names = self.bind_identities(server_round, parsed, rejected)
        proof_seconds: dict[str, float] = {}
        accepted, failed = verify_round(subs, self.run_id, server_round, self.public_keys, self.cfg.norm_bound,
                                        self.cfg.frac_bits, self.cfg.bits, self.seen_digests,
                                        expected_size=layout.size, require_proof=self.cfg.proof,
                                        proof_seconds=proof_seconds)
        proof_seconds = {names.get(inst, inst): sec for inst, sec in proof_seconds.items()}
        rejected.update({names.get(inst, inst): f"{inst}: {why}" for inst, why in failed.items()})
        if not accepted:
            return None, ZkRoundResult(layout, [], rejected, np.zeros(0, np.int64), [], 0, proof_seconds)
        self.seen_digests.update(s.digest for s in accepted)
        for sub in accepted:  # a valid signature binds the institution to its node for the rest of the run
            if self.node_of.get(sub.node_id) is None:
                self.node_of[sub.node_id] = names[sub.node_id]
        total, blindings, weight = aggregate(accepted, self.equal_weights)
        new_global = apply_aggregate({k: np.asarray(v) for k, v in global_arrays.items()}, total, layout, weight,
                                     self.cfg.frac_bits)
        return new_global, ZkRoundResult(layout, accepted, rejected, total, blindings, weight, proof_seconds)


@dataclass(frozen=True)
class ZkLedger:
    """Writes the run's ledger (``ledger.jsonl``) for ``finlora zk audit``: a header, then one line per round,
    each written after that round's file is saved (the line holds the file's hash). Owned by the recorder
    (``server/recorder.py``; a router run's ``server/router_round.py``)."""

    cfg: ZkConfig
    run_id: str
    run_dir: Path
    public_keys: Mapping[str, Any]
    equal_weights: bool = False
    server_optimizer: ServerOptimizer | None = None
    """FedAdam/FedYogi: the header states its hyperparameters, and the audit recomputes every step."""
    artifact: str = "adapter_model.safetensors"
    """The file in ``round-<k>/`` that holds the round's global tensors: the adapter, or a mixture's router."""

    @classmethod
    def of(cls, verifier: ZkVerifier, server_optimizer: ServerOptimizer | None = None,
           artifact: str = "adapter_model.safetensors") -> ZkLedger:
        """The ledger of the run ``verifier`` checks: its parameters, run id, directory, keys and weighting."""
        return cls(verifier.cfg, verifier.run_id, verifier.run_dir, verifier.public_keys, verifier.equal_weights,
                   server_optimizer, artifact)

    def artifact_path(self, server_round: int) -> str:
        """Round ``server_round``'s file, relative to the run directory (what a ledger line names)."""
        return f"round-{server_round}/{self.artifact}"

    def write_header(self) -> None:
        """First ledger line: keys, parameters and the round-0 file's hash (call after saving round 0)."""
        append_entry(self.run_dir, header_entry(self.run_id, dict(self.public_keys),
                                                file_sha256(self.run_dir / self.artifact_path(0)), self.cfg.norm_bound,
                                                self.cfg.frac_bits, self.cfg.bits, round0_adapter=self.artifact_path(0),
                                                weighting="equal" if self.equal_weights else "examples",
                                                proofs=self.cfg.proof, secagg=self.cfg.secagg,
                                                server_optimizer=(self.server_optimizer.to_json()
                                                                  if self.server_optimizer else None)))

    def record(self, server_round: int, result: ZkRoundResult) -> None:
        """Ledger line of a round (call after its file is saved: the line holds the file's hash)."""
        record_round(self.run_dir, server_round, result.layout, result.accepted,
                     {str(k): v for k, v in result.rejected.items()}, result.aggregate, result.blindings,
                     result.total_weight, adapter_file=self.artifact_path(server_round),
                     weight_divisor=result.weight_divisor)

    def record_kept(self, server_round: int, rejected: Mapping[str, str], reason: str) -> None:
        """Ledger line of a round that kept the previous global tensors (after its file is saved)."""
        record_kept_round(self.run_dir, server_round, rejected, reason, adapter_file=self.artifact_path(server_round))

    def record_outcome(self, server_round: int, outcome: Any) -> None:
        """The ledger line of round ``server_round`` (0: the header) from the strategy's ``RoundOutcome`` (``None``
        for round 0), once the round's file is saved."""
        if server_round == 0:
            self.write_header()
        elif outcome is not None and outcome.kept_previous:
            self.record_kept(server_round, outcome.rejected, outcome.kept_previous)
        elif outcome is not None and outcome.zk is not None:
            self.record(server_round, outcome.zk)
