"""The last step of a server round: write down what it produced.

Given the global adapter after a round and that round's immutable :class:`server.strategy.RoundOutcome`, the
recorder measures the held-out loss, runs the benchmark evaluation when one is due, saves the adapter, the zk
ledger line (it holds the adapter file's hash), the wire log, and last the ``metrics.jsonl`` line: a round appears
in ``metrics.jsonl``, which ``--resume`` trusts, only once all of its files are on disk, so a server killed between
two of these writes loses no ledger entry of a round it counts as done. It reads nothing back from the strategy and
changes nothing in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.supercore import log

from finlora.common.adapter import Arrays
from finlora.common.config import FinloraConfig
from finlora.server.benchmark_eval import run_benchmark_evals
from finlora.server.checkpoint import RunDirectory
from finlora.server.heldout import HeldoutEvaluator
from finlora.server.strategy import RoundOutcome
from finlora.server.zk_round import ZkLedger


def round_summary(server_round: int, outcome: RoundOutcome | None, heldout_loss: float | None,
                  weighting: str = "examples") -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a round (``weighting``: how the server weighed the accepted updates)."""
    clients = outcome.clients if outcome else {}
    examples = sum(c["num_examples"] for c in clients.values())  # every accepted reply has both (server/strategy)
    train_loss = (sum(c["train_loss"] * c["num_examples"] for c in clients.values()) / examples
                  if examples else None)
    eval_clients = outcome.client_eval if outcome else {}
    eval_examples = sum(c["num-examples"] for c in eval_clients.values())
    errors = dict(outcome.errors) if outcome else {}
    return {
        "round": server_round,
        "train_loss": train_loss,
        "heldout_loss": heldout_loss,
        "federated_eval_loss": (sum(c["eval-loss"] * c["num-examples"] for c in eval_clients.values())
                                / eval_examples if eval_examples else None),
        "seconds": (time.perf_counter() - outcome.started) if outcome else 0.0,
        "aggregate_seconds": outcome.aggregate_seconds if outcome else 0.0,
        "num_clients": len(clients),
        "bytes_sent_per_client": ((sum(c.get("bytes_sent", 0) for c in clients.values()) / len(clients))
                                  if clients else 0),
        "bytes_received_per_client": (max((w["array_bytes"] for w in outcome.wire
                                           if w["direction"] == "server->client"), default=0) if outcome else 0),
        "clients": {node: dict(c) for node, c in clients.items()},
        "privacy": {node: ({k[3:]: v for k, v in c.items() if k.startswith("dp_")}
                           | {"partition_id": c.get("partition_id")})
                    for node, c in clients.items() if "dp_epsilon" in c},
        "refused": sorted(node for node, reason in errors.items()
                          if "PrivacyBudgetExhausted" in reason or "PrivacyPolicyViolation" in reason),
        "rejected": dict(outcome.rejected) if outcome else {},
        "eval_rejected": dict(outcome.eval_rejected) if outcome else {},
        "weighting": weighting,
        "kept_previous": outcome.kept_previous if outcome else "",
        "zk_verify_seconds": dict(outcome.zk.proof_seconds) if outcome and outcome.zk else {},
        "errors": errors,
    }


@dataclass
class RoundRecorder:
    """Writes every round of a run (see the module doc); :attr:`aggregated_rounds` says which rounds learned."""

    cfg: FinloraConfig
    run_dir: RunDirectory
    peft_config: Any
    weighting: str
    evaluator: HeldoutEvaluator | None = None
    ledger: ZkLedger | None = None
    extra_summary: Callable[[int], Mapping[str, Any]] | None = None
    """Extra keys of a round's metrics line (client-level DP's privacy spent after that many rounds)."""
    aggregated_rounds: list[int] = field(default_factory=list)

    def record(self, server_round: int, adapter: Arrays, outcome: RoundOutcome | None,
               optimizer_state: Arrays | None = None) -> float | None:
        """Write round ``server_round`` (``outcome`` None: round 0, the initial adapter); returns its held-out loss."""
        if outcome is not None and outcome.aggregated:
            self.aggregated_rounds.append(server_round)
        elif outcome is not None:
            log(WARNING, "round %d kept the previous global adapter: %s", server_round, outcome.kept_previous)
        heldout = self.evaluator.loss(adapter) if self.evaluator else None
        summary = round_summary(server_round, outcome, heldout, self.weighting)
        if self.extra_summary is not None:
            summary.update(self.extra_summary(server_round))
        evaluations = run_benchmark_evals(self.cfg, server_round, adapter, self.run_dir.path)
        if evaluations:
            summary["eval"] = evaluations
        self.run_dir.save_round(server_round, adapter, self.peft_config, optimizer_state=optimizer_state)
        if self.ledger is not None:
            self.ledger.record_outcome(server_round, outcome)
        if outcome is not None:
            self.run_dir.append_wire(list(outcome.wire))
        self.run_dir.append_metrics(summary)  # last: the round counts as done from here on
        log(INFO, "round %d saved to %s (held-out loss %s)", server_round, self.run_dir.round_dir(server_round),
            f"{heldout:.4f}" if heldout is not None else "n/a")
        return heldout
