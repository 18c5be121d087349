"""Secure aggregation on the server (``zk.secagg``): one round's four masking stages, driven over Flower by the
strategy wrapper, between the verified training replies and the recorder.

The server never holds an update here: it verifies each reply's signature and zero-knowledge proof against the
commitments, routes the stages (``zk/secagg.py`` is the protocol, ``zk/secagg_codec.py`` its wire format), unmasks
only the weighted sum, and accepts it only if it opens the weighted row commitments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from finlora.server.zk_round import ZkRoundResult, ZkVerifier
from finlora.zk import codec, secagg
from finlora.zk import secagg_codec as secagg_wire
from finlora.zk.commit import num_rows
from finlora.zk.encoding import Layout, apply_aggregate
from finlora.zk.secagg import Packing, RoundContext, SecAggError, SecAggServer, aggregate_opens
from finlora.zk.verify import verify_committed

log = logging.getLogger(__name__)


Exchange = Callable[[str, Mapping[str, Mapping[str, Any]]], dict[str, dict[str, Any]]]
"""Send one secure-aggregation stage to nodes ({node id: request fields}) and return {node id: reply fields} of
those that answered in time (the strategy implements it with Flower query messages)."""


def secure_aggregate(verifier: ZkVerifier, server_round: int, replies: list[tuple[str, Any]],
                     global_arrays: Mapping[str, np.ndarray], exchange: Exchange
                     ) -> tuple[dict[str, np.ndarray] | None, ZkRoundResult]:
    """``zk.secagg``: verify every reply's signature and zero-knowledge proof (there are no values to look at), run
    the four masking stages with the verified institutions, unmask only the weighted sum, and accept it only if it
    opens the weighted row commitments. Any :class:`SecAggError` drops the round (previous adapter kept) with the
    culprits named where the protocol knows them."""
    cfg = verifier.cfg
    layout = Layout.from_tensors({k: np.asarray(v) for k, v in global_arrays.items()})
    rejected: dict[str, str] = {}
    parsed: list[tuple[str, str, Any, Any]] = []
    for node_id, content in replies:
        try:
            fields = dict(content.config_records[codec.ZK_RECORD])  # no values: update_problem saw to that
            institution, sub = codec.decode_committed(fields)
            parsed.append((str(node_id), institution, sub, secagg_wire.ad_from_fields(institution, sub.num_examples,
                                                                                      fields)))
        except (KeyError, ValueError, TypeError) as exc:
            rejected[str(node_id)] = f"malformed zk submission: {exc}"
    subs, node_of = verifier.bind_identities(server_round, [(n, i, s) for n, i, s, _ in parsed], rejected)
    ads = {institution: ad for node, institution, _, ad in parsed if node_of.get(institution) == node}
    proof_seconds: dict[str, float] = {}
    accepted, failed = verify_committed(subs, verifier.run_id, server_round, verifier.public_keys, cfg.norm_bound,
                                        cfg.frac_bits, cfg.bits, verifier.seen_digests, layout.size, proof_seconds)
    rejected.update({node_of.get(inst, inst): f"{inst}: {why}" for inst, why in failed.items()})
    proof_seconds = {node_of.get(inst, inst): sec for inst, sec in proof_seconds.items()}

    def dropped(reason: str, culprits: Mapping[str, str]) -> tuple[None, ZkRoundResult]:
        for inst, why in culprits.items():
            rejected[node_of.get(inst, inst)] = f"{inst}: {why}"
        return None, ZkRoundResult(layout, [], rejected, np.zeros(0, np.int64), [], 0, proof_seconds,
                                   kept_reason=f"secure aggregation: {reason}")

    identities = {s.node_id: verifier.public_keys[s.node_id] for s in accepted}
    server = SecAggServer(RoundContext(verifier.run_id, server_round), identities, cfg.secagg_threshold or None)
    try:
        server.collect_advertisements([ads[s.node_id] for s in accepted])

        def ask(stage: str, requests: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
            answers = exchange(stage, {node_of[inst]: {secagg_wire.STAGE: stage, **req}
                                       for inst, req in requests.items()})
            by_name = {inst: answers[node] for inst, node in node_of.items() if node in answers}
            return {inst: a for inst, a in by_name.items() if a.get(secagg_wire.STAGE) == stage}

        all_ads = secagg_wire.ads_to_bytes(server.ads)
        shares = ask(secagg_wire.SHARE, {n: {"ads": all_ads, "threshold": server.threshold} for n in server.ads})
        routed = server.route_shares(_decoded(server, shares, lambda r: secagg_wire.bundle_from_bytes(r["bundle"])))
        weights = server.weights(verifier.equal_weights)
        packing = Packing.for_round(layout.size, num_rows(layout.size), cfg.bits, sum(weights.values()))
        masked = ask(secagg_wire.MASK, {n: {"bundles": secagg_wire.bundles_to_bytes(routed[n])} for n in routed})
        digests = {s.node_id: s.digest for s in accepted}
        inputs = []
        for item in _decoded(server, masked, secagg_wire.masked_from_fields):
            if item.commitments_digest == digests[item.name]:
                inputs.append(item)
            else:
                server.culprits[item.name] = f"{secagg.MALFORMED}: masked input bound to other commitments"
        survivors = server.collect_masked(inputs, packing)
        names = secagg_wire.names_to_bytes(survivors)
        signed = ask(secagg_wire.SIGN, {n: {"survivors": names} for n in survivors})
        sigs = secagg_wire.signatures_to_bytes({n: bytes(r.get("signature", b"")) for n, r in signed.items()})
        unmasked = ask(secagg_wire.UNMASK, {n: {"survivors": names, "signatures": sigs} for n in survivors})
        responses = _decoded(server, unmasked, lambda r: secagg_wire.unmask_from_bytes(r["response"]))
        total, blindings = server.unmask(survivors, responses, packing)
        kept = [s for s in accepted if s.node_id in survivors]
        if not aggregate_opens(total, blindings, {s.node_id: s.commitments for s in kept}, weights):
            raise SecAggError("the unmasked sum does not open the weighted commitments (an institution masked "
                              "something other than its committed update, or a mask that does not cancel)",
                              server.culprits)
    except SecAggError as exc:
        log.warning("zk: round %d: secure aggregation failed: %s", server_round, exc)
        return dropped(str(exc), exc.culprits)
    for inst, why in server.culprits.items():
        rejected[node_of.get(inst, inst)] = f"{inst}: {why}"
    for inst in set(ads) - set(survivors) - set(failed):
        rejected.setdefault(node_of[inst], f"{inst}: secagg-dropped: left before sending its masked update")
    verifier.seen_digests.update(s.digest for s in kept)
    for sub in kept:
        if verifier.node_of.get(sub.node_id) is None:
            verifier.node_of[sub.node_id] = node_of[sub.node_id]
    divisor = next(ads[s.node_id].num_examples // weights[s.node_id] for s in kept) if not verifier.equal_weights \
        else 1
    total_weight = sum(weights[s.node_id] for s in kept)
    new_global = apply_aggregate({k: np.asarray(v) for k, v in global_arrays.items()}, total, layout, total_weight,
                                 cfg.frac_bits)
    return new_global, ZkRoundResult(layout, kept, rejected, total, blindings, total_weight, proof_seconds,
                                     weight_divisor=divisor)


def _decoded(server: SecAggServer, replies: Mapping[str, Mapping[str, Any]],
             decode: Callable[[Mapping[str, Any]], Any]) -> list[Any]:
    """Each institution's reply decoded; one that does not parse, or speaks in another institution's name, makes
    its sender a culprit and is left out."""
    out = []
    for inst, reply in replies.items():
        try:
            item = decode(reply)
        except (KeyError, ValueError) as exc:
            server.culprits[inst] = f"{secagg.MALFORMED}: {exc}"
            continue
        if item.name != inst:
            server.culprits[inst] = f"{secagg.MALFORMED}: a reply in the name of {item.name}"
        else:
            out.append(item)
    return out
