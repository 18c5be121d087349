"""An institution's node config, parsed and checked once.

Flower hands every task the SuperNode's node config as a flat mapping of strings, numbers and booleans. Who wrote
it decides what it may contain: ``finlora client`` for a deployed institution (its private data file, its own DP
policy, its signing key, its resident trainer), the simulation for a simulated one (a partition of shared data).
Every key is read here, with its type checked and a clear error naming it, instead of in the five modules that
need one; those modules take a :class:`NodeSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROGRESS_KEY = "progress-file"
"""Where ``finlora client`` wants the ClientApp to record each finished task (client/progress.py)."""


class NodeConfigError(ValueError):
    """A node-config value of the wrong type or out of range (the message names the key)."""


def _text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key, "")
    return "" if value is None else str(value)


def _int(raw: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    whole = (isinstance(value, int) and not isinstance(value, bool)
             or isinstance(value, float) and value.is_integer()
             or isinstance(value, str) and value.strip().lstrip("-").isdigit())
    if not whole:
        raise NodeConfigError(f"node config {key} = {value!r}: expected a whole number")
    number = int(value)
    if number < minimum:
        raise NodeConfigError(f"node config {key} = {number}: expected at least {minimum}")
    return number


def _positive(raw: Mapping[str, Any], key: str) -> float | None:
    if key not in raw or raw[key] in ("", None):
        return None
    try:
        value = float(raw[key])
    except (TypeError, ValueError) as exc:
        raise NodeConfigError(f"node config {key} = {raw[key]!r}: expected a number") from exc
    if not value > 0:
        raise NodeConfigError(f"node config {key} = {value!r}: expected a positive number")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise NodeConfigError(f"node config {key} = {value!r}: expected true or false")


@dataclass(frozen=True)
class NodeSettings:
    """What an institution's node config says (see the module doc). Empty strings mean "not set"."""

    data_path: str = ""
    """A deployed institution's private data file; empty for a simulated one (it trains on a partition)."""
    partition_id: int = 0
    num_partitions: int = 1
    institution: str = ""
    zk_key: str = ""
    zk_peers: str = ""
    """Directory of the institutions' public keys (``<name>.pub.pem``), this institution's own copy: secure
    aggregation checks every peer's signed keys against it, never against keys the server hands out."""
    trainer_socket: str = ""
    trainer_authkey_file: str = ""
    progress_file: str = ""
    dp_required: bool = True
    secagg_required: bool = True
    """A deployed institution sends its update only masked (``zk.secagg``): a run config that would send it in the
    clear (``zk.secagg = false`` or ``zk.enabled = false``) is refused, unless ``finlora client --allow-unmasked``."""
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float | None = None
    dp_state_dir: str = ""

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | NodeSettings | None) -> NodeSettings:
        """Check every key finlora reads; raises :class:`NodeConfigError` naming the first bad one."""
        if isinstance(raw, NodeSettings):
            return raw
        raw = raw or {}
        return cls(data_path=_text(raw, "data-path"),
                   partition_id=_int(raw, "partition-id", 0, 0),
                   num_partitions=_int(raw, "num-partitions", 1, 1),
                   institution=_text(raw, "institution"),
                   zk_key=_text(raw, "zk-key"),
                   zk_peers=_text(raw, "zk-peers"),
                   trainer_socket=_text(raw, "trainer-socket"),
                   trainer_authkey_file=_text(raw, "trainer-authkey-file"),
                   progress_file=_text(raw, PROGRESS_KEY),
                   dp_required=_bool(raw, "dp-required", True),
                   secagg_required=_bool(raw, "secagg-required", True),
                   dp_epsilon=_positive(raw, "dp-epsilon"),
                   dp_delta=_positive(raw, "dp-delta"),
                   dp_max_grad_norm=_positive(raw, "dp-max-grad-norm"),
                   dp_state_dir=_text(raw, "dp-state-dir"))

    @property
    def deployed(self) -> bool:
        """A deployed institution names its private data file; a simulated one has a partition id."""
        return bool(self.data_path)

    @property
    def data_key(self) -> tuple[str, int, int]:
        """(data-path, partition-id, num-partitions): which local data this node trains on (a data-path wins)."""
        return self.data_path, self.partition_id, self.num_partitions

    @property
    def institution_name(self) -> str:
        """The name an institution signs with: ``institution``, else ``institution-<partition>``."""
        return self.institution or f"institution-{self.partition_id}"
