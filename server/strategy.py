"""finlora's round on the server: any Flower strategy (FedAvg / FedProx / FedAdam / FedYogi), made LoRA-aware.

One round reads top to bottom as: :class:`LoraStrategy` (this wrapper) -> the wire codec (``common/transport.py``
for float updates, ``zk/codec.py`` for committed ones) -> the verifier (``server/zk_round.py``, zk mode;
``server/secagg_round.py`` with ``zk.secagg``, whose masking stages the wrapper sends as ``query.secagg`` messages)
-> the wrapped strategy's aggregation (Flower's own, or the exact integer aggregate in zk mode, along which
FedAdam/FedYogi then take their own server step) -> the recorder
(``server/recorder.py``), which receives the round's immutable :class:`RoundOutcome`.

:class:`LoraStrategy` wraps a Flower strategy the way Flower's DP wrappers do and adds, without touching its
arithmetic:

* **validation** of every training reply before aggregation: exactly the adapter's A/B keys (or B only in
  FFA-LoRA mode), the right shapes and dtype, finite values, the delta's L2 norm under the bound, a positive
  and plausible example count (with zk, equal to the signed count), a finite ``train-loss`` and finite scalar
  metrics. Float16/int8 updates are decoded to float32 first (``common/transport.py``).
  A bad update is logged with the node id and the reason and left out; the round goes on with the others,
  and a round with fewer valid updates than ``min_train_nodes`` keeps the previous global adapter (one
  institution's update alone is never published as the global adapter).
* **one weight, set by the server**: every accepted reply reaches Flower with a normalised metric record
  holding only :data:`WEIGHT_KEY` (the example count, or 1 with ``strategy.weighting = equal`` and with
  client-level DP) and the loss, so Flower's consistency check (``InconsistentMessageReplies``, which fails the
  whole run) never sees a client's extra or missing key, and no client chooses its own weight. Evaluation
  replies are normalised the same way.
* **a wire log** of what actually crossed Flower in both directions (record names, array keys, shapes,
  bytes), which is how we prove that only LoRA tensors travel.
* **per-client records** (train loss, examples, tokens, seconds, bytes) for ``metrics.jsonl``.
* **a round offset**, so a resumed run numbers its rounds (and the clients' learning-rate schedule)
  from where it stopped.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedProx, FedYogi,
                                     Strategy)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from finlora.common.adapter import AdapterError, Arrays, arrays_digest, check_arrays, from_array_record, to_array_record
from finlora.common.config import StrategyConfig
from finlora.common.transport import NORM_SLACK, TRANSPORT_RECORD, decode_update, delta_norm, wire_dtype
from finlora.server.secagg_round import secure_aggregate
from finlora.server.zk_round import ZkRoundResult, ZkVerifier
from finlora.zk import codec
from finlora.zk.secagg_codec import QUERY_ACTION, SECAGG_RECORD
from finlora.zk.server_opt import ServerOptimizer

WEIGHT_KEY = "finlora-weight"
"""The only weight Flower aggregates by; the server sets it on every accepted reply and never reads it from one."""
MAX_METRIC_KEYS = 64
"""A reply with more metrics than this is rejected (they are kept in ``metrics.jsonl``)."""


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def checked_metrics(metrics: Mapping[str, Any], loss_key: str, max_examples: int) -> tuple[dict[str, Any], str | None]:
    """(the reply's metrics, why they are unusable or ``None``): ``num-examples`` a whole number from 1 to
    ``max_examples``, ``loss_key`` present, every value a finite number, at most :data:`MAX_METRIC_KEYS` keys."""
    values = dict(metrics)
    examples = values.get("num-examples")
    if not _finite_number(examples) or not float(examples).is_integer() or not 1 <= examples <= max_examples:
        return values, (f"metric 'num-examples' must be a whole number from 1 to {max_examples} "
                        f"(strategy.max-examples), got {examples!r}")
    if len(values) > MAX_METRIC_KEYS:
        return values, f"{len(values)} metrics, at most {MAX_METRIC_KEYS} are accepted"
    if loss_key not in values:
        return values, f"metric '{loss_key}' must be a finite number, got None"
    for key, value in values.items():
        if not _finite_number(value):
            return values, f"metric {key[:80]!r} must be a finite number, got {str(value)[:80]}"
    return values, None


@dataclass
class _RoundLog:
    """What the wrapper gathers during one (absolute) round; frozen into a :class:`RoundOutcome` at its end."""

    started: float = field(default_factory=time.perf_counter)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    wire: list[dict[str, Any]] = field(default_factory=list)
    aggregated: bool = False
    aggregate_seconds: float = 0.0
    client_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_rejected: dict[str, str] = field(default_factory=dict)
    zk: ZkRoundResult | None = None
    kept_previous: str = ""


@dataclass(frozen=True)
class RoundOutcome:
    """Everything one round produced, for the recorder: accepted clients (their reported metrics), rejected ones
    with reasons, errors, the federated evaluation, the wire log, the zk result, and why the previous global
    adapter was kept (empty when the round aggregated)."""

    round: int
    started: float
    clients: Mapping[str, Mapping[str, Any]]
    rejected: Mapping[str, str]
    errors: Mapping[str, str]
    wire: tuple[dict[str, Any], ...]
    aggregated: bool
    aggregate_seconds: float
    client_eval: Mapping[str, Mapping[str, Any]]
    eval_rejected: Mapping[str, str]
    zk: ZkRoundResult | None
    kept_previous: str


def describe_message(msg: Message, direction: str, server_round: int) -> dict[str, Any]:
    """A wire-log entry: every record in the message, and for array records each key, shape and size."""
    content = msg.content
    node = msg.metadata.dst_node_id if direction == "server->client" else msg.metadata.src_node_id
    arrays = {name: {key: list(rec[key].shape) for key in rec.keys()} for name, rec in content.array_records.items()}
    return {
        "round": server_round,
        "direction": direction,
        "message_type": msg.metadata.message_type,
        "node_id": str(node),
        "records": sorted(content.keys()),
        "arrays": arrays,
        "array_bytes": sum(rec.count_bytes() for rec in content.array_records.values()),
        "config_bytes": sum(rec.count_bytes() for rec in content.config_records.values()),
        "sha256": {name: arrays_digest(from_array_record(rec)) for name, rec in content.array_records.items()},
    }


def short_reason(reason: str, limit: int = 400) -> str:
    """The gist of a client's error: Flower wraps the exception's message in a Ray traceback."""
    marker = "Message: "
    gist = reason[reason.rfind(marker) + len(marker):] if marker in reason else reason
    wrapped = re.search(r"<class '[\w.]+'>:<'(.*)", gist, re.S)  # a deployed ClientApp: "<class 'X'>:<'message'>"
    gist = wrapped.group(1) if wrapped else gist
    exc_type = re.search(r"<class '([\w.]+)'>", reason)
    text = " ".join(gist.replace("\\n", " ").split()).rstrip("'>")
    name = exc_type.group(1) if exc_type and "ray.exceptions" not in exc_type.group(1) else ""
    return (f"{name}: " if name and not text.startswith(name.rsplit(".", 1)[-1]) else "") + text[:limit]


class NotEnoughNodesError(RuntimeError):
    """Fewer institutions than ``strategy.min-available-nodes`` stayed connected for a whole ``round-timeout``."""


class NodeWaitDeadline:
    """A Grid whose ``get_node_ids`` waits (polling once a second) until ``needed`` institutions are connected, and
    raises once ``timeout`` has passed.

    Flower's ``FedAvg.configure_train`` computes its sample size from the nodes connected at that instant and only
    then waits for ``min_available_nodes`` (``sample_nodes``, which has no deadline of its own): a round that
    started while some institutions were still connecting sampled only the early ones, even with
    ``fraction-train = 1``. Waiting here first makes the sample count every institution that was needed."""

    def __init__(self, grid: Grid, timeout: float, needed: int, what: str) -> None:
        self._grid, self._deadline, self._needed, self._what = grid, time.monotonic() + timeout, needed, what
        self._timeout = timeout

    def get_node_ids(self) -> Iterable[int]:
        while len(ids := list(self._grid.get_node_ids())) < self._needed and time.monotonic() <= self._deadline:
            time.sleep(1.0)
        if len(ids) < self._needed:
            raise NotEnoughNodesError(
                f"{self._what}: only {len(ids)} of the {self._needed} institutions needed "
                f"(strategy.min-available-nodes / min-train-nodes) connected within {self._timeout:.0f}s "
                f"(strategy.round-timeout)")
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def update_problem(content: RecordDict, expected_shapes: Mapping[str, tuple[int, ...]],
                   current_global: Mapping[str, np.ndarray], max_update_norm: float, max_examples: int,
                   zk: bool, secagg: bool = False) -> tuple[str | None, Arrays | None]:
    """(why a training reply cannot be aggregated or ``None``, its float32 decoding when it arrived as
    float16/int8). Pure: reads the reply, changes nothing. With ``secagg`` (``zk.secagg``) the reply must carry no
    update values: they reach the server only masked, in the later stages."""
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return (f"expected one array record 'arrays' and one metric record 'metrics', got "
                f"{sorted(content.array_records)} and {sorted(content.metric_records)}"), None
    metrics, problem = checked_metrics(content["metrics"], "train-loss", max_examples)
    if problem:
        return problem, None
    received = from_array_record(content["arrays"])
    if zk:
        zk_record = content.config_records.get(codec.ZK_RECORD)
        signed = zk_record.get(codec.NUM_EXAMPLES) if zk_record is not None else None
        if signed != metrics["num-examples"]:  # one weight: the signed count is what the aggregate uses
            return (f"metric 'num-examples' = {metrics['num-examples']!r} differs from the signed zk count "
                    f"{signed!r}"), None
        if secagg:
            return (None, None) if not received else ("a secure-aggregation reply must not carry update values",
                                                      None)
        try:
            check_arrays(received, expected_shapes, "update", integer=True)
        except AdapterError as exc:
            return str(exc), None
        return None, None
    transport = dict(content[TRANSPORT_RECORD]) if TRANSPORT_RECORD in content.config_records else None
    try:
        check_arrays(received, expected_shapes, "update", dtype=wire_dtype(transport, "update"))
        decoded = decode_update(received, transport, current_global, "update")
        check_arrays(decoded, expected_shapes, "decoded update")
    except AdapterError as exc:
        return str(exc), None
    norm = delta_norm({k: decoded[k].astype("float64") - current_global[k] for k in decoded})
    if max_update_norm > 0 and norm > max_update_norm * (1 + NORM_SLACK):
        return f"update L2 norm {norm:.4g} exceeds strategy.max-update-norm = {max_update_norm:g}", None
    return None, (decoded if transport is not None else None)


class LoraStrategy(Strategy):
    """Wraps any Flower strategy, as Flower's DP wrappers do, with finlora's round (see the module doc).

    The wrapped strategy keeps its own arithmetic (FedAvg's average, FedAdam's server step); this wrapper
    validates and normalises the replies before they reach it, or, with zk, verifies and aggregates the committed
    integers itself (:class:`server.zk_round.ZkVerifier`, owned here). What happened in a round is read back
    as one immutable :class:`RoundOutcome` (:meth:`outcome`) by the recorder (``server/recorder.py``).
    """

    def __init__(self, strategy: FedAvg, expected_shapes: Mapping[str, tuple[int, ...]], *, round_offset: int = 0,
                 verifier: ZkVerifier | None = None, max_update_norm: float = 0.0, max_examples: int = 10**7,
                 node_wait_timeout: float = 3600.0, weighting: str = "examples") -> None:
        super().__init__()
        self.strategy = strategy
        self.expected_shapes = dict(expected_shapes)
        self.round_offset = round_offset
        self.verifier = verifier
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.node_wait_timeout = node_wait_timeout
        self.weighting = weighting  # "examples" or "equal" (checked when the config loads)
        self.current_global: dict[str, np.ndarray] = {}
        """What updates are deltas from: zk aggregation, float16/int8 decoding and the norm bound need it."""
        self._logs: dict[int, _RoundLog] = {}
        self._sent_messages: list[Message] = []
        self._grid: Grid | None = None

    def __repr__(self) -> str:
        return f"finlora LoRA rounds around {self.strategy!r}"

    def summary(self) -> None:
        log(INFO, "\t├──> finlora: %d LoRA tensors, update norm bound %g, weighting %s, zk %s, secure aggregation %s",
            len(self.expected_shapes), self.max_update_norm, self.weighting, self.verifier is not None,
            self.verifier is not None and self.verifier.cfg.secagg)
        self.strategy.summary()

    @property
    def weighted_by_key(self) -> str:
        return self.strategy.weighted_by_key

    @property
    def min_valid(self) -> int:
        """Fewest valid updates a round aggregates: Flower's ``min_train_nodes`` (at least one)."""
        return max(1, int(self.strategy.min_train_nodes))

    def weight_of(self, num_examples: int) -> float:
        """The FedAvg weight of an accepted reply (``strategy.weighting``), computed here, never reported."""
        return 1.0 if self.weighting == "equal" else float(num_examples)

    def _log(self, absolute_round: int) -> _RoundLog:
        return self._logs.setdefault(absolute_round, _RoundLog())

    def outcome(self, absolute_round: int) -> RoundOutcome:
        """What round ``absolute_round`` produced (call after it ended; a round that did not aggregate says why)."""
        rec = self._logs.get(absolute_round)
        if rec is None:
            rec = _RoundLog(kept_previous=f"round {absolute_round}: no training replies arrived")
        kept_previous = rec.kept_previous
        if not rec.aggregated and not kept_previous:
            kept_previous = (f"round {absolute_round}: nothing was aggregated ({len(rec.clients)} accepted, "
                             f"{len(rec.rejected)} rejected: {rec.rejected}, {len(rec.errors)} errors: {rec.errors})")
        return RoundOutcome(absolute_round, rec.started, dict(rec.clients), dict(rec.rejected), dict(rec.errors),
                            tuple(rec.wire), rec.aggregated, rec.aggregate_seconds, dict(rec.client_eval),
                            dict(rec.eval_rejected), rec.zk, kept_previous)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        rec = self._log(absolute)
        rec.started = time.perf_counter()
        self.current_global = from_array_record(arrays)
        needed = max(self.strategy.min_available_nodes, self.strategy.min_train_nodes)
        messages = list(self.strategy.configure_train(
            absolute, arrays, config, NodeWaitDeadline(grid, self.node_wait_timeout, needed, f"round {absolute}")))
        rec.wire += [describe_message(m, "server->client", absolute) for m in messages]
        self._sent_messages = messages  # Flower sets their message ids in place when it pushes them
        self._grid = grid  # secure aggregation's stages talk to the same nodes after the training replies
        return messages

    def _reply_node(self, msg: Message) -> str:
        """The institution a reply is about. For an institution that stopped answering (missed heartbeats, a
        reply that expired) the SuperLink itself replies, as node ``SUPERLINK_NODE_ID``: map it back through the
        message it answers."""
        if msg.metadata.src_node_id == SUPERLINK_NODE_ID:
            for sent in self._sent_messages:
                if sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return str(sent.metadata.dst_node_id)
        return str(msg.metadata.src_node_id)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.round_offset
        rec = self._log(absolute)
        accepted = []
        replies = list(replies)
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for sent in self._sent_messages:
            if sent.metadata.message_id not in answered:
                node = str(sent.metadata.dst_node_id)
                rec.errors[node] = "no reply within strategy.round-timeout"
                log(WARNING, "round %d: node %s failed: %s", absolute, node, rec.errors[node])
        for msg in replies:
            node = self._reply_node(msg)
            if msg.has_error():
                rec.errors[node] = short_reason(msg.error.reason)
                log(WARNING, "round %d: node %s failed: %s", absolute, node, rec.errors[node])
                accepted.append(msg)  # Flower's own check logs and skips it
                continue
            rec.wire.append(describe_message(msg, "client->server", absolute))
            problem, decoded = update_problem(msg.content, self.expected_shapes, self.current_global,
                                              self.max_update_norm, self.max_examples, self.verifier is not None,
                                              self.verifier is not None and self.verifier.cfg.secagg)
            if problem:
                log(WARNING, "round %d: rejected the update of node %s: %s", absolute, node, problem)
                rec.rejected[node] = problem
                continue
            if decoded is not None:  # float16/int8 on the wire: the wrapped strategy averages float32 weights
                msg.content["arrays"] = to_array_record(decoded)
                del msg.content[TRANSPORT_RECORD]
            metrics = dict(msg.content["metrics"])
            rec.clients[node] = {k.replace("-", "_"): v for k, v in metrics.items()}
            msg.content["metrics"] = MetricRecord({WEIGHT_KEY: self.weight_of(int(metrics["num-examples"])),
                                                   "train-loss": float(metrics["train-loss"])})
            accepted.append(msg)
        start = time.perf_counter()
        if self.verifier is None:
            valid = sum(not m.has_error() for m in accepted)
            arrays, metrics_out = (self._keep_previous(absolute, rec, valid) if valid < self.min_valid
                                   else self.strategy.aggregate_train(absolute, accepted))
        else:
            arrays, metrics_out = self._aggregate_committed(absolute, rec, accepted)
        rec.aggregate_seconds = time.perf_counter() - start
        rec.aggregated = arrays is not None
        return arrays, metrics_out

    def _keep_previous(self, server_round: int, rec: _RoundLog, valid: int) -> tuple[None, None]:
        rec.kept_previous = (f"{valid} valid update(s), fewer than strategy.min-train-nodes = {self.min_valid}: "
                             f"the previous global adapter is kept")
        log(WARNING, "round %d: %s", server_round, rec.kept_previous)
        return None, None

    def _aggregate_committed(self, server_round: int, rec: _RoundLog,
                             replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """zk mode: verify every update's signature, commitments and bound, then aggregate the committed integers
        exactly (FedAvg weighted by integer example counts); failing updates are excluded with their reason."""
        assert self.verifier is not None
        valid = [m for m in replies if not m.has_error()]
        pairs = [(str(m.metadata.src_node_id), m.content) for m in valid]
        if self.verifier.cfg.secagg:
            new_global, result = secure_aggregate(self.verifier, server_round, pairs, self.current_global,
                                                  lambda stage, requests: self._exchange(server_round, stage, requests))
        else:
            new_global, result = self.verifier.verify_and_aggregate(server_round, pairs, self.current_global)
        rec.zk = result
        for node, reason in result.rejected.items():
            log(WARNING, "round %d: rejected the update of node %s: %s", server_round, node, reason)
            rec.rejected[node] = reason
            rec.clients.pop(node, None)
        kept = [m.content for m in valid if str(m.metadata.src_node_id) not in result.rejected]
        if result.kept_reason:
            rec.kept_previous = f"{result.kept_reason}: the previous global adapter is kept"
            log(WARNING, "round %d: %s", server_round, rec.kept_previous)
            return None, None
        if new_global is None or len(kept) < self.min_valid:
            return self._keep_previous(server_round, rec, len(kept))
        if isinstance(self.strategy, (FedAdam, FedYogi)):
            new_global = self._server_step(server_round, new_global, valid[0])
        return to_array_record(new_global), aggregate_metricrecords(kept, self.weighted_by_key)

    def _server_step(self, server_round: int, averaged: dict[str, np.ndarray], template: Message
                     ) -> dict[str, np.ndarray]:
        """FedAdam/FedYogi in zk mode: the wrapped strategy's own server step along the verified committed average,
        handed to it as the one reply of a FedAvg (weight 1: FedAvg returns it unchanged), cast to float32. The
        audit recomputes this step from the ledger (``zk/server_opt.py``)."""
        content = RecordDict({"arrays": to_array_record(averaged), "metrics": MetricRecord({WEIGHT_KEY: 1.0})})
        stepped, _ = self.strategy.aggregate_train(server_round,
                                                   [Message(content=content, metadata=copy.copy(template.metadata))])
        if stepped is None:
            raise RuntimeError(f"round {server_round}: {self.strategy.__class__.__name__} returned no arrays")
        return {k: np.asarray(v, dtype=np.float32) for k, v in from_array_record(stepped).items()}

    def _exchange(self, server_round: int, stage: str, requests: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
        """One secure-aggregation stage over Flower: a ``query.secagg`` message per node, the replies that came
        back without error within ``strategy.round-timeout`` (the rest count as dropped), all in the wire log."""
        if self._grid is None:
            raise RuntimeError("secure aggregation needs the grid of configure_train")
        rec = self._log(server_round)
        messages = [Message(RecordDict({SECAGG_RECORD: ConfigRecord(dict(fields))}), dst_node_id=int(node),
                            message_type=f"query.{QUERY_ACTION}", group_id=str(server_round))
                    for node, fields in requests.items()]
        rec.wire += [describe_message(m, "server->client", server_round) for m in messages]
        answers: dict[str, dict[str, Any]] = {}
        replies = list(self._grid.send_and_receive(messages, timeout=self.node_wait_timeout))
        addressee = {m.metadata.message_id: str(m.metadata.dst_node_id) for m in messages}
        for reply in replies:
            # a node that died is answered for by the SuperLink: name it through the message it answers
            node = addressee.get(reply.metadata.reply_to_message_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                rec.errors.setdefault(node, f"secagg {stage}: {short_reason(reply.error.reason)}")
                log(WARNING, "round %d: node %s failed secagg stage %s: %s", server_round, node, stage,
                    short_reason(reply.error.reason))
                continue
            rec.wire.append(describe_message(reply, "client->server", server_round))
            if SECAGG_RECORD in reply.content.config_records:
                answers[node] = dict(reply.content.config_records[SECAGG_RECORD])
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id, node in addressee.items():
            if message_id not in answered:
                rec.errors.setdefault(node, f"secagg {stage}: no reply within strategy.round-timeout")
        return answers

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        needed = max(self.strategy.min_available_nodes, self.strategy.min_evaluate_nodes)
        messages = list(self.strategy.configure_evaluate(
            absolute, arrays, config, NodeWaitDeadline(grid, self.node_wait_timeout, needed,
                                                        f"round {absolute} (evaluation)")))
        self._log(absolute).wire += [describe_message(m, "server->client", absolute) for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's aggregation over the evaluation replies that pass :func:`checked_metrics` (normalised to the
        server's weight, the loss and the count); a bad one is recorded in ``eval_rejected`` and left out."""
        absolute = server_round + self.round_offset
        rec = self._log(absolute)
        usable = []
        for msg in replies:
            if msg.has_error():
                usable.append(msg)  # Flower's own check logs and skips it
                continue
            node = self._reply_node(msg)
            if list(msg.content.metric_records) != ["metrics"] or msg.content.array_records:
                problem: str | None = (f"expected one metric record 'metrics' and no arrays, got "
                                       f"{sorted(msg.content.metric_records)} and {sorted(msg.content.array_records)}")
            else:
                metrics, problem = checked_metrics(msg.content["metrics"], "eval-loss", self.max_examples)
            if problem:
                log(WARNING, "round %d: rejected the evaluation of node %s: %s", absolute, node, problem)
                rec.eval_rejected[node] = problem
                continue
            rec.client_eval[node] = metrics
            msg.content["metrics"] = MetricRecord({WEIGHT_KEY: self.weight_of(int(metrics["num-examples"])),
                                                   "eval-loss": float(metrics["eval-loss"])})
            usable.append(msg)
        return self.strategy.aggregate_evaluate(absolute, usable)


STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}
"""Flower's strategies, used as they are: FedProx's ``proximal-mu`` is the clients' ``mu/2 ||w - w_global||^2``;
FedAdam/FedYogi run Adam/Yogi on the server over the averaged LoRA delta."""


def make_strategy(cfg: StrategyConfig, expected_shapes: dict[str, tuple[int, ...]],
                  round_offset: int = 0, zk: ZkVerifier | None = None, client_level_clip: float | None = None,
                  ) -> LoraStrategy:
    """Build the configured strategy, aggregating by the server-set :data:`WEIGHT_KEY`.

    ``client_level_clip``: client-level DP's clipping norm. Its sensitivity analysis assumes every institution
    weighs the same and moves the mean by at most that norm, so then every weight is 1 and an update above the
    norm is rejected (whatever ``strategy.weighting`` and ``strategy.max-update-norm`` say).
    """
    if cfg.name not in STRATEGIES:
        raise ValueError(f"strategy.name must be one of {', '.join(STRATEGIES)}, got '{cfg.name}'")
    common: dict[str, Any] = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                                  min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_evaluate_nodes,
                                  min_available_nodes=cfg.min_available_nodes, weighted_by_key=WEIGHT_KEY)
    if cfg.name == "fedprox":
        common["proximal_mu"] = cfg.proximal_mu
    elif cfg.name in ("fedadam", "fedyogi"):
        common.update(eta=cfg.server_lr, tau=cfg.server_tau)
    bound, weighting = cfg.max_update_norm, cfg.weighting
    if client_level_clip is not None:
        bound = min(bound, client_level_clip) if bound > 0 else client_level_clip
        weighting = "equal"
    log(INFO, "finlora strategy %s over %d LoRA tensors", cfg.name, len(expected_shapes))
    return LoraStrategy(STRATEGIES[cfg.name](**common), expected_shapes, round_offset=round_offset, verifier=zk,
                        max_update_norm=bound, max_examples=cfg.max_examples, node_wait_timeout=cfg.round_timeout,
                        weighting=weighting)


def optimizer_state(strategy: LoraStrategy) -> dict[str, Any] | None:
    """FedAdam/FedYogi moments (``m.<key>``, ``v.<key>``) to save with a round; ``None`` for other strategies.

    Flower keeps them in ``m_t``/``v_t``; a resumed run that started them from zero would take a different
    (too large, bias-corrected) first step than the uninterrupted run.
    """
    inner = strategy.strategy
    m_t, v_t = getattr(inner, "m_t", None), getattr(inner, "v_t", None)
    if not isinstance(inner, (FedAdam, FedYogi)) or not m_t or not v_t:
        return None
    return {**{f"m.{k}": v for k, v in m_t.items()}, **{f"v.{k}": v for k, v in v_t.items()}}


def server_optimizer_of(strategy: LoraStrategy) -> ServerOptimizer | None:
    """The wrapped FedAdam/FedYogi's hyperparameters, for the zk ledger's header (``None`` for other strategies)."""
    inner = strategy.strategy
    if not isinstance(inner, (FedAdam, FedYogi)):
        return None
    return ServerOptimizer("fedadam" if isinstance(inner, FedAdam) else "fedyogi", float(inner.eta),
                           float(inner.beta_1), float(inner.beta_2), float(inner.tau))


def restore_optimizer_state(strategy: LoraStrategy, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    inner = strategy.strategy
    if isinstance(inner, (FedAdam, FedYogi)):
        inner.m_t = {k[2:]: v for k, v in state.items() if k.startswith("m.")}
        inner.v_t = {k[2:]: v for k, v in state.items() if k.startswith("v.")}


def sampled_clients_per_round(cfg: StrategyConfig) -> int:
    """Institutions sampled each training round when all ``min_available_nodes`` are connected."""
    return max(int(cfg.min_available_nodes * cfg.fraction_train), cfg.min_train_nodes)


def with_client_level_dp(strategy: LoraStrategy, noise_multiplier: float, clipping_norm: float,
                         num_sampled_clients: int) -> DifferentialPrivacyClientSideFixedClipping:
    """Flower's client-side fixed clipping wrapper: institutions clip their update (``client/mods.py``), the
    server adds Gaussian noise of std ``noise_multiplier * clipping_norm / num_sampled_clients`` to the mean."""
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=noise_multiplier,
                                                      clipping_norm=clipping_norm,
                                                      num_sampled_clients=num_sampled_clients)
