"""An institution's side of secure aggregation (``zk.secagg``): what it remembers after training, and how it
answers each of the server's four ``query.secagg`` stages (share keys, masked input, sign survivors, unmask).

The trained update, its blindings and this round's ephemeral secrets stay in the node's own ``context.state``
(the institution's process), never in a message; the server receives the update only masked. The peers'
identity keys come from the institution's own copy of the public-key registry (node config ``zk-peers``, in
simulation the run's key directory), never from the server, which could otherwise swap in its own keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from finlora.client.dp_setup import PrivacyPolicyViolation
from finlora.client.node_settings import NodeSettings
from finlora.common.config import ZkConfig
from finlora.zk import secagg_codec as wire
from finlora.zk.codec import encode_committed
from finlora.zk.commit import GROUP_ORDER, num_rows
from finlora.zk.secagg import Packing, RoundContext, SecAggClient, SecAggError, round_weights
from finlora.zk.signing import load_key_registry
from finlora.zk.verify import Submission
from finlora.zk.wire import pack_blindings, unpack_blindings

STATE_RECORD = "finlora-secagg"
VALUES_RECORD = "finlora-secagg-values"


def enforce_masking(zk: ZkConfig, node: NodeSettings) -> None:
    """Refuse (raise :class:`PrivacyPolicyViolation`) a run config that would send a deployed institution's update
    to the server in the clear when its node config requires secure aggregation (``secagg-required``, on unless
    ``finlora client --allow-unmasked``): the server must not be able to switch masking off for it. Simulated
    institutions follow the run config (one user plays every party)."""
    if not node.deployed or not node.secagg_required or (zk.enabled and zk.secagg):
        return
    setting = "zk.enabled = false" if not zk.enabled else "zk.secagg = false"
    raise PrivacyPolicyViolation(f"run config {setting} would send this institution's update to the server "
                                 f"unmasked, but it requires secure aggregation (node config secagg-required; "
                                 f"start the client with --allow-unmasked to allow)")


def remember_for_secagg(state: Any, sub: Submission, key: Ed25519PrivateKey, run_id: str, server_round: int,
                        institution: str) -> dict[str, Any]:
    """Keep the update and fresh round secrets in ``state``; return the reply's zk fields (commitments, proof,
    advertisement: no values, no blindings)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord  # lazily, like every Flower import on the task path

    if state is None:
        raise ValueError("zk.secagg needs the node's state to keep the update between stages")
    client = SecAggClient(institution, key, RoundContext(run_id, int(server_round)), int(sub.num_examples))
    ad = client.advertise()
    state[STATE_RECORD] = ConfigRecord({"client": client.to_state(), "blindings": pack_blindings(sub.blindings),
                                        "digest": sub.digest, "round": int(server_round)})
    state[VALUES_RECORD] = ArrayRecord({"values": Array(np.asarray(sub.values, dtype=np.int64))})
    return encode_committed(sub, institution, wire.ad_fields(ad))


def peer_keys(node_peers: str, keys_dir: Path) -> dict[str, Any]:
    """The institutions' registered public keys, from this institution's own copy."""
    path = Path(node_peers) if node_peers else keys_dir
    if not path.is_dir():
        raise FileNotFoundError(f"zk.secagg: the institutions' public keys are not at {path} (node config zk-peers)")
    return load_key_registry(path)


def secagg_stage(fields: dict[str, Any], state: Any, key: Ed25519PrivateKey, peers: dict[str, Any],
                 bits: int, equal_weights: bool) -> dict[str, Any]:
    """Answer one stage; raises :class:`SecAggError` when the request is one an honest client must refuse."""
    from flwr.app import ConfigRecord

    if STATE_RECORD not in state:
        raise SecAggError("no secure-aggregation round in progress on this node")
    saved = state[STATE_RECORD]
    client = SecAggClient.from_state(saved["client"], key)
    stage = fields.get(wire.STAGE)
    if stage == wire.SHARE:
        bundle = client.share_keys(wire.ads_from_bytes(fields["ads"]), int(fields["threshold"]), peers)
        reply: dict[str, Any] = {"bundle": wire.bundle_to_bytes(bundle)}
    elif stage == wire.MASK:
        client.receive_shares(wire.bundles_from_bytes(fields["bundles"]))
        values = np.asarray(state[VALUES_RECORD]["values"].numpy(), dtype=np.int64)
        blindings = unpack_blindings(saved["blindings"])
        weights = round_weights(client.advertised, equal_weights)
        packing = Packing.for_round(len(values), num_rows(len(values)), bits, sum(weights.values()))
        weight = weights[client.name]
        item = client.masked_input(weight * values, [weight * r % GROUP_ORDER for r in blindings], packing,
                                   bytes(saved["digest"]))
        del state[VALUES_RECORD]  # the update is in the sum now; nothing here needs it again
        reply = wire.masked_fields(item)
    elif stage == wire.SIGN:
        reply = {"signature": client.sign_survivors(wire.names_from_bytes(fields["survivors"]))}
    elif stage == wire.UNMASK:
        resp = client.unmask(wire.names_from_bytes(fields["survivors"]),
                             wire.signatures_from_bytes(fields["signatures"]), peers)
        reply = {"response": wire.unmask_to_bytes(resp)}
    else:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r} (expected one of {', '.join(wire.STAGES)})")
    saved["client"] = client.to_state()
    state[STATE_RECORD] = ConfigRecord(dict(saved))
    return {wire.STAGE: str(stage), **reply}
