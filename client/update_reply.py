"""The update part of an institution's training reply, the same for a LoRA adapter and a mixture's router.

Without zk: the float update clipped to ``strategy.max-update-norm`` and encoded as ``transport.dtype``. With zk:
the quantized update committed, signed and (``zk.proof``) proven within its bound; with ``zk.secagg`` the reply
carries no values at all and the update waits in the node's state for the masking stages. Kept apart from
``client/tasks.py`` so that both kinds of training round (``tasks`` and ``router_task``) reply through one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from finlora.client.node_settings import NodeSettings
from finlora.client.zk_update import signing_key_file, zk_reply_records
from finlora.common.adapter import Arrays, to_array_record
from finlora.common.config import FinloraConfig
from finlora.common.transport import TRANSPORT_RECORD, encode_update
from finlora.zk.codec import ZK_RECORD


@dataclass(frozen=True)
class UpdateRecords:
    """The reply's update: its array record, extra records (transport or zk), their bytes and update metrics."""

    arrays: Any
    extra: dict[str, Any]
    extra_bytes: int
    metrics: dict[str, Any]


def update_records(cfg: FinloraConfig, node: NodeSettings, run_id: int, local: Arrays, received: Arrays,
                   server_round: int, num_examples: int, seed: int, state: Any = None) -> UpdateRecords:
    """The float update clipped to ``strategy.max-update-norm`` and encoded as ``transport.dtype``, or with zk
    the committed, signed quantized update. ``local`` and ``received`` hold the tensors that travel (the update is
    their difference)."""
    if not cfg.zk.enabled:
        encoded = encode_update(local, received, cfg.transport.dtype, cfg.strategy.max_update_norm)
        extra = {TRANSPORT_RECORD: ConfigRecord(encoded.record)} if encoded.record else {}
        return UpdateRecords(to_array_record(encoded.arrays), extra, sum(r.count_bytes() for r in extra.values()),
                             {"update-norm": encoded.norm, "update-clipped": int(encoded.clipped)})
    keys_dir = zk_keys_dir(cfg, run_id)
    record, zk_record, zk_metrics = zk_reply_records(local, received, cfg.zk, signing_key_file(node, keys_dir),
                                                     cfg.signed_run_id(run_id), server_round, node.institution_name,
                                                     num_examples, seed, state)
    return UpdateRecords(record, {ZK_RECORD: zk_record},
                         sum(len(v) for v in zk_record.values() if isinstance(v, bytes)), zk_metrics)


def zk_keys_dir(cfg: FinloraConfig, run_id: int) -> Path:
    """Where this run's institution keys live: ``zk.keys-dir``, or the run directory's ``keys`` (simulation)."""
    return Path(cfg.zk.keys_dir) if cfg.zk.keys_dir else cfg.resolved_out_dir() / cfg.run_name(run_id) / "keys"
