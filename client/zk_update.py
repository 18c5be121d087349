"""The client's side of the commitment layer: quantize the update, commit, sign, and pack it for Flower.

What travels is the *quantized delta* (local minus global) of the adapter's LoRA tensors, as integer arrays
keyed by their PEFT names, plus a ``zk`` ConfigRecord with the row commitments, their blindings (the
opening: the server sees individual updates in this layer) and the Ed25519 signature binding run, round,
institution, commitments and example count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finlora.client.node_settings import NodeSettings
from finlora.client.secagg_stage import remember_for_secagg
from finlora.common.config import ZkConfig
from finlora.zk import codec
from finlora.zk.encoding import quantize_update
from finlora.zk.signing import load_private_key
from finlora.zk.verify import make_submission

log = logging.getLogger(__name__)


def institution_name(node_config: Mapping[str, Any] | NodeSettings) -> str:
    """The name an institution signs with: ``institution`` in its node config, else ``institution-<partition>``."""
    return NodeSettings.parse(node_config).institution_name


def signing_key_file(node: NodeSettings, keys_dir: Path) -> Path:
    """A deployed institution names its key in its node config (``zk-key``); a simulated one has it in the run's
    key directory."""
    return Path(node.zk_key) if node.zk_key else keys_dir / f"{node.institution_name}.key"


def zk_reply_records(local: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray], zk: ZkConfig,
                     key_file: Path, run_id: str, server_round: int, institution: str, num_examples: int,
                     seed: int, state: Any = None) -> tuple[Any, Any, dict[str, float]]:
    """(ArrayRecord of int update tensors, ConfigRecord :data:`zk.codec.ZK_RECORD`, metrics) for the reply of a
    training round, laid out by :func:`zk.codec.encode`. With ``zk.proof`` the record carries the zero-knowledge
    range + norm proof, and the metrics say how long it took and how big it is.

    With ``zk.secagg`` the reply carries no values and no blindings: the array record is empty and the zk record
    holds the commitments, the proof and this round's secure-aggregation advertisement; the update itself waits in
    the node's ``state`` (``client/secagg_stage.py``) until the server asks for the masked input."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    delta = {k: np.asarray(local[k], np.float64) - np.asarray(global_arrays[k], np.float64) for k in local}
    values, layout = quantize_update(delta, zk.norm_bound, zk.frac_bits, zk.bits, np.random.default_rng(seed))
    if not key_file.is_file():
        raise FileNotFoundError(f"zk signing key of {institution} not found: {key_file}")
    start = time.perf_counter()
    proof_params = (zk.bits, zk.norm_bound, zk.frac_bits) if zk.proof else None
    key = load_private_key(key_file)
    sub = make_submission(values, num_examples, key, run_id, server_round, institution,
                          proof_params, progress=lambda msg: log.info("%s round %d: zk proof of %d values: %s",
                                                                       institution, server_round, len(values), msg))
    metrics = ({"zk-prove-seconds": time.perf_counter() - start, "zk-proof-bytes": len(sub.proof)}
               if zk.proof else {})
    if zk.secagg:
        fields = remember_for_secagg(state, sub, key, run_id, server_round, institution)
        return ArrayRecord(), ConfigRecord(fields), metrics
    tensors, fields = codec.encode(sub, layout, zk.bits, institution)
    return ArrayRecord({key: Array(value) for key, value in tensors.items()}), ConfigRecord(fields), metrics
