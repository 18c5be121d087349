"""finlora's strategies: Flower's FedAvg / FedProx / FedAdam / FedYogi, made LoRA-aware.

:class:`LoraRoundMixin` sits in front of a Flower strategy and adds, without touching Flower's arithmetic:

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

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedProx,
                                     FedYogi)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from common.adapter import AdapterError, arrays_digest, check_arrays, from_array_record, to_array_record
from common.config import StrategyConfig
from common.transport import NORM_SLACK, TRANSPORT_RECORD, decode_update, delta_norm, wire_dtype
from server.zk_round import ZkVerifier
from zk import codec

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
class RoundRecord:
    """What the mixin saw during one (absolute) round."""

    started: float = field(default_factory=time.perf_counter)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    wire: list[dict[str, Any]] = field(default_factory=list)
    aggregated: bool = False
    aggregate_seconds: float = 0.0
    client_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_rejected: dict[str, str] = field(default_factory=dict)
    zk: Any = None
    kept_previous: str = ""
    """Why this round kept the previous global adapter (empty: it aggregated, or it has not ended)."""


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


class _NodeWaitDeadline:
    """A Grid whose ``get_node_ids`` raises once ``timeout`` has passed: Flower's ``sample_nodes`` polls it once a
    second while fewer than ``min_available_nodes`` are connected and has no deadline of its own."""

    def __init__(self, grid: Grid, timeout: float, needed: int, what: str) -> None:
        self._grid, self._deadline, self._needed, self._what = grid, time.monotonic() + timeout, needed, what
        self._timeout = timeout

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        if time.monotonic() > self._deadline:
            raise NotEnoughNodesError(
                f"{self._what}: only {len(ids)} of the {self._needed} institutions needed "
                f"(strategy.min-available-nodes / min-train-nodes) connected within {self._timeout:.0f}s "
                f"(strategy.round-timeout)")
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class LoraRoundMixin:
    """Validation, wire log, per-client records and round offset for a Flower strategy (see module doc)."""

    expected_shapes: dict[str, tuple[int, ...]]
    round_offset: int
    rounds: dict[int, RoundRecord]
    zk: ZkVerifier | None
    current_global: dict[str, Any]
    max_update_norm: float
    max_examples: int
    weighting: str

    def setup_lora(self, expected_shapes: dict[str, tuple[int, ...]], round_offset: int = 0,
                   zk: ZkVerifier | None = None, max_update_norm: float = 0.0, max_examples: int = 10**7,
                   node_wait_timeout: float = 3600.0, weighting: str = "examples") -> None:
        self.expected_shapes = dict(expected_shapes)
        self.round_offset = round_offset
        self.rounds = {}
        self.zk = zk
        self.current_global = {}
        self.node_wait_timeout = node_wait_timeout
        self._sent_messages: list[Message] = []
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.weighting = weighting  # "examples" or "equal" (checked when the config loads)

    def weight_of(self, num_examples: int) -> float:
        """The FedAvg weight of an accepted reply (``strategy.weighting``), computed here, never reported."""
        return 1.0 if self.weighting == "equal" else float(num_examples)

    def record(self, absolute_round: int) -> RoundRecord:
        return self.rounds.setdefault(absolute_round, RoundRecord())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        rec = self.record(absolute)
        rec.started = time.perf_counter()
        # what updates are deltas from: zk aggregation, float16/int8 decoding and the norm bound need it
        self.current_global = from_array_record(arrays)
        needed = max(self.min_available_nodes, self.min_train_nodes)  # type: ignore[attr-defined]
        messages = list(super().configure_train(  # type: ignore[misc]
            absolute, arrays, config, _NodeWaitDeadline(grid, self.node_wait_timeout, needed, f"round {absolute}")))
        rec.wire += [describe_message(m, "server->client", absolute) for m in messages]
        self._sent_messages = messages  # Flower sets their message ids in place when it pushes them
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
        rec = self.record(absolute)
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
            problem = self._problem_with(msg)
            if problem:
                log(WARNING, "round %d: rejected the update of node %s: %s", absolute, node, problem)
                rec.rejected[node] = problem
                continue
            metrics = dict(msg.content["metrics"])
            rec.clients[node] = {k.replace("-", "_"): v for k, v in metrics.items()}
            msg.content["metrics"] = MetricRecord({WEIGHT_KEY: self.weight_of(int(metrics["num-examples"])),
                                                   "train-loss": float(metrics["train-loss"])})
            accepted.append(msg)
        start = time.perf_counter()
        if self.zk is None:
            valid = sum(not m.has_error() for m in accepted)
            arrays, metrics = (self._keep_previous(absolute, rec, valid) if valid < self.min_valid
                               else super().aggregate_train(absolute, accepted))  # type: ignore[misc]
        else:
            arrays, metrics = self._aggregate_committed(absolute, rec, accepted)
        rec.aggregate_seconds = time.perf_counter() - start
        rec.aggregated = arrays is not None
        return arrays, metrics

    @property
    def min_valid(self) -> int:
        """Fewest valid updates a round aggregates: Flower's ``min_train_nodes`` (at least one)."""
        return max(1, int(self.min_train_nodes))  # type: ignore[attr-defined]

    def _keep_previous(self, server_round: int, rec: RoundRecord, valid: int) -> tuple[None, None]:
        rec.kept_previous = (f"{valid} valid update(s), fewer than strategy.min-train-nodes = {self.min_valid}: "
                             f"the previous global adapter is kept")
        log(WARNING, "round %d: %s", server_round, rec.kept_previous)
        return None, None

    def _aggregate_committed(self, server_round: int, rec: RoundRecord,
                             replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """zk mode: verify every update's signature, commitments and bound, then aggregate the committed integers
        exactly (FedAvg weighted by integer example counts); failing updates are excluded with their reason."""
        valid = [m for m in replies if not m.has_error()]
        new_global, result = self.zk.verify_and_aggregate(  # type: ignore[union-attr]
            server_round, [(str(m.metadata.src_node_id), m.content) for m in valid], self.current_global)
        rec.zk = result
        for node, reason in result.rejected.items():
            log(WARNING, "round %d: rejected the update of node %s: %s", server_round, node, reason)
            rec.rejected[node] = reason
            rec.clients.pop(node, None)
        kept = [m.content for m in valid if str(m.metadata.src_node_id) not in result.rejected]
        if new_global is None or len(kept) < self.min_valid:
            return self._keep_previous(server_round, rec, len(kept))
        return to_array_record(new_global), aggregate_metricrecords(kept, self.weighted_by_key)  # type: ignore[attr-defined]

    def _problem_with(self, msg: Message) -> str | None:
        """Why a training reply cannot be aggregated (``None``: it can). A float16/int8 reply that passes is
        replaced in place by its float32 decoding, so Flower's strategy averages float32 weights."""
        content = msg.content
        if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
            return (f"expected one array record 'arrays' and one metric record 'metrics', got "
                    f"{sorted(content.array_records)} and {sorted(content.metric_records)}")
        metrics, problem = checked_metrics(content["metrics"], "train-loss", self.max_examples)
        if problem:
            return problem
        received = from_array_record(content["arrays"])
        if self.zk is not None:
            zk_record = content.config_records.get(codec.ZK_RECORD)
            signed = zk_record.get("num_examples") if zk_record is not None else None
            if signed != metrics["num-examples"]:  # one weight: the signed count is what the aggregate uses
                return (f"metric 'num-examples' = {metrics['num-examples']!r} differs from the signed zk count "
                        f"{signed!r}")
            try:
                check_arrays(received, self.expected_shapes, "update", integer=True)
            except AdapterError as exc:
                return str(exc)
            return None
        transport = dict(content[TRANSPORT_RECORD]) if TRANSPORT_RECORD in content.config_records else None
        try:
            check_arrays(received, self.expected_shapes, "update", dtype=wire_dtype(transport, "update"))
            decoded = decode_update(received, transport, self.current_global, "update")
            check_arrays(decoded, self.expected_shapes, "decoded update")
        except AdapterError as exc:
            return str(exc)
        norm = delta_norm({k: decoded[k].astype("float64") - self.current_global[k] for k in decoded})
        if self.max_update_norm > 0 and norm > self.max_update_norm * (1 + NORM_SLACK):
            return f"update L2 norm {norm:.4g} exceeds strategy.max-update-norm = {self.max_update_norm:g}"
        if transport is not None:
            content["arrays"] = to_array_record(decoded)
            del content[TRANSPORT_RECORD]
        return None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        needed = max(self.min_available_nodes, self.min_evaluate_nodes)  # type: ignore[attr-defined]
        messages = list(super().configure_evaluate(  # type: ignore[misc]
            absolute, arrays, config, _NodeWaitDeadline(grid, self.node_wait_timeout, needed,
                                                        f"round {absolute} (evaluation)")))
        self.record(absolute).wire += [describe_message(m, "server->client", absolute) for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's aggregation over the evaluation replies that pass :func:`checked_metrics` (normalised to the
        server's weight, the loss and the count); a bad one is recorded in ``eval_rejected`` and left out."""
        absolute = server_round + self.round_offset
        rec = self.record(absolute)
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
        return super().aggregate_evaluate(absolute, usable)  # type: ignore[misc]


class LoraFedAvg(LoraRoundMixin, FedAvg):
    """FedAvg (weighted by ``num-examples``) over LoRA A/B, with finlora's checks and records."""


class LoraFedProx(LoraRoundMixin, FedProx):
    """FedProx: FedAvg plus the ``proximal-mu`` the clients add as ``mu/2 ||w - w_global||^2``."""


class LoraFedAdam(LoraRoundMixin, FedAdam):
    """FedAdam: Adam on the server over the averaged LoRA delta."""


class LoraFedYogi(LoraRoundMixin, FedYogi):
    """FedYogi: Yogi on the server over the averaged LoRA delta."""


STRATEGIES: dict[str, type[LoraRoundMixin]] = {
    "fedavg": LoraFedAvg, "fedprox": LoraFedProx, "fedadam": LoraFedAdam, "fedyogi": LoraFedYogi,
}


def make_strategy(cfg: StrategyConfig, expected_shapes: dict[str, tuple[int, ...]],
                  round_offset: int = 0, zk: ZkVerifier | None = None, client_level_clip: float | None = None,
                  ) -> LoraRoundMixin:
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
    strategy = STRATEGIES[cfg.name](**common)
    bound, weighting = cfg.max_update_norm, cfg.weighting
    if client_level_clip is not None:
        bound = min(bound, client_level_clip) if bound > 0 else client_level_clip
        weighting = "equal"
    strategy.setup_lora(expected_shapes, round_offset, zk, bound, cfg.max_examples, cfg.round_timeout, weighting)
    log(INFO, "finlora strategy %s over %d LoRA tensors", cfg.name, len(expected_shapes))
    return strategy


def optimizer_state(strategy: LoraRoundMixin) -> dict[str, Any] | None:
    """FedAdam/FedYogi moments (``m.<key>``, ``v.<key>``) to save with a round; ``None`` for other strategies.

    Flower keeps them in ``m_t``/``v_t``; a resumed run that started them from zero would take a different
    (too large, bias-corrected) first step than the uninterrupted run.
    """
    m_t, v_t = getattr(strategy, "m_t", None), getattr(strategy, "v_t", None)
    if not isinstance(strategy, (FedAdam, FedYogi)) or not m_t or not v_t:
        return None
    return {**{f"m.{k}": v for k, v in m_t.items()}, **{f"v.{k}": v for k, v in v_t.items()}}


def restore_optimizer_state(strategy: LoraRoundMixin, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    strategy.m_t = {k[2:]: v for k, v in state.items() if k.startswith("m.")}  # type: ignore[attr-defined]
    strategy.v_t = {k[2:]: v for k, v in state.items() if k.startswith("v.")}  # type: ignore[attr-defined]


def sampled_clients_per_round(cfg: StrategyConfig) -> int:
    """Institutions sampled each training round when all ``min_available_nodes`` are connected."""
    return max(int(cfg.min_available_nodes * cfg.fraction_train), cfg.min_train_nodes)


def with_client_level_dp(strategy: LoraRoundMixin, noise_multiplier: float, clipping_norm: float,
                         num_sampled_clients: int) -> DifferentialPrivacyClientSideFixedClipping:
    """Flower's client-side fixed clipping wrapper: institutions clip their update (``client/mods.py``), the
    server adds Gaussian noise of std ``noise_multiplier * clipping_norm / num_sampled_clients`` to the mean."""
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=noise_multiplier,
                                                      clipping_norm=clipping_norm,
                                                      num_sampled_clients=num_sampled_clients)
