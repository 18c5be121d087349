"""Secure aggregation (zk/secagg.py): the server gets the exact weighted sum and nothing else, dropouts up to n - t
are survived, and every way a client or the server could cheat is refused, detected or named.

The protocol runs in process here with real X25519, ChaCha20, Ed25519, Shamir/Feldman and Pedersen commitments;
each test plays one attacker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from flwr.app import ConfigRecord, RecordDict

from finlora.client.secagg_stage import STATE_RECORD, secagg_stage
from finlora.common.config import ConfigError, load_config
from finlora.zk import signing
from finlora.zk.commit import GROUP_ORDER, commit_rows, commitments_digest, num_rows
from finlora.zk.secagg_codec import STAGE, UNMASK, names_to_bytes, signatures_to_bytes
from finlora.zk.secagg import (BAD_SHARE, BAD_SIGNATURE, FALSE_COMPLAINT, Packing, RoundContext, SecAggClient,
                               SecAggError, SecAggServer, aggregate_opens, default_threshold, field_stream, mask_vector,
                               reconstruct, round_weights, shamir_share, share_valid)

LENGTH = 9000  # nine commitment rows of 1,024 (commit.row_size), the last one ragged
BITS = 16


@dataclass
class Party:
    name: str
    key: object
    values: np.ndarray
    commitments: list[bytes]
    blindings: list[int]
    examples: int
    client: SecAggClient | None = None


@dataclass
class Round:
    """One round's parties and server after the masked inputs were collected (stages 1-3)."""

    ctx: RoundContext
    parties: dict[str, Party]
    server: SecAggServer
    packing: Packing
    weights: dict[str, int]
    survivors: list[str]
    masked: dict[str, bytes] = field(default_factory=dict)

    def expected(self, names) -> tuple[np.ndarray, list[int]]:
        total = sum(self.weights[n] * self.parties[n].values for n in names)
        rows = num_rows(LENGTH)
        blind = [sum(self.weights[n] * self.parties[n].blindings[k] for n in names) % GROUP_ORDER
                 for k in range(rows)]
        return total, blind

    def finish(self, responders=None, signers=None):
        """Stages 4-5: survivors sign the survivor set, responders reveal shares, the server unmasks."""
        signers = self.survivors if signers is None else signers
        sigs = {n: self.parties[n].client.sign_survivors(self.survivors) for n in signers}
        identities = self.server.identities
        responders = self.survivors if responders is None else responders
        responses = [self.parties[n].client.unmask(self.survivors, sigs, identities)
                     for n in responders]
        return self.server.unmask(self.survivors, responses, self.packing)


def make_parties(n: int, seed: int = 0, examples=None) -> dict[str, Party]:
    rng = np.random.default_rng(seed)
    parties = {}
    for i in range(n):
        values = rng.integers(-(1 << 15) + 1, 1 << 15, LENGTH).astype(np.int64)
        commitments, blindings = commit_rows(values)
        name = f"bank-{i}"
        parties[name] = Party(name, signing.generate_key(), values, commitments, blindings,
                              (examples or [128] * n)[i])
    return parties


def run_round(parties: dict[str, Party], round_num: int = 3, drop_before_masked=(), tamper=None,
              share_tamper=None) -> Round:
    """Stages 1-3 with honest clients unless ``tamper(name, weighted, blindings)`` changes what one masks or
    ``share_tamper(bundle)`` changes what one deals."""
    ctx = RoundContext("run-secagg", round_num)
    identities = {n: p.key.public_key() for n, p in parties.items()}
    server = SecAggServer(ctx, identities)
    for p in parties.values():
        p.client = SecAggClient(p.name, p.key, ctx, p.examples)
    ads = server.collect_advertisements([p.client.advertise() for p in parties.values()])
    bundles = [p.client.share_keys(ads, server.threshold, identities) for p in parties.values()]
    if share_tamper is not None:
        bundles = [share_tamper(b) for b in bundles]
    routed = server.route_shares(bundles)
    for name, inbox in routed.items():
        parties[name].client.receive_shares(inbox)
    weights = round_weights(ads)
    packing = Packing.for_round(LENGTH, num_rows(LENGTH), BITS, sum(weights.values()))
    inputs = []
    for name in routed:
        if name in drop_before_masked:
            continue
        p = parties[name]
        weighted = weights[name] * p.values
        blind = [weights[name] * r % GROUP_ORDER for r in p.blindings]
        if tamper is not None:
            weighted, blind = tamper(name, weighted, blind)
        inputs.append(p.client.masked_input(weighted, blind, packing, commitments_digest(p.commitments)))
    survivors = server.collect_masked(inputs, packing)
    return Round(ctx, parties, server, packing, weights, survivors, {i.name: i.vector for i in inputs})


def advertised(n: int, seed: int, round_num: int = 1):
    """(parties, context, their clients, their signed advertisements, the identity registry) after stage 1."""
    parties = make_parties(n, seed=seed)
    ctx = RoundContext("run-secagg", round_num)
    clients = {name: SecAggClient(name, p.key, ctx, 10) for name, p in parties.items()}
    ads = {name: c.advertise() for name, c in clients.items()}
    return parties, ctx, clients, ads, {name: p.key.public_key() for name, p in parties.items()}


def commitments_of(rnd: Round, names) -> dict[str, list[bytes]]:
    return {n: rnd.parties[n].commitments for n in names}


# ------------------------------------------------------------------------------------------------ building blocks
def test_field_stream_is_deterministic_in_range_and_key_dependent():
    a = field_stream(b"a" * 32, 5000)
    assert a == field_stream(b"a" * 32, 5000) and len(a) == 5000
    assert all(0 <= v < GROUP_ORDER for v in a)
    assert max(a) > GROUP_ORDER * 0.99  # spans the whole field, not 2^32 or 2^64
    assert not set(a) & set(field_stream(b"b" * 32, 5000))
    with pytest.raises(ValueError, match="32 bytes"):
        field_stream(b"short", 1)


def test_shamir_any_threshold_shares_rebuild_and_feldman_catches_a_wrong_share():
    secret = 123456789 ** 5 % GROUP_ORDER
    sharing = shamir_share(secret, 3, range(1, 6))
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert reconstruct({x: sharing.shares[x] for x in subset}) == secret
    assert reconstruct({x: sharing.shares[x] for x in (1, 2)}) != secret
    assert all(share_valid(x, s, sharing.commitments) for x, s in sharing.shares.items())
    assert not share_valid(2, (sharing.shares[2] + 1) % GROUP_ORDER, sharing.commitments)
    assert not share_valid(2, sharing.shares[3], sharing.commitments)


def test_packing_round_trips_extreme_values_summed_over_clients():
    limit = (1 << 15) - 1
    weights = [7, 1, 12, 3]
    packing = Packing.for_round(LENGTH, num_rows(LENGTH), BITS, sum(weights))
    vectors = [np.full(LENGTH, limit * (-1) ** i, dtype=np.int64) for i in range(4)]
    vectors[1][::3] = -limit
    total = sum(packing.pack(w * v, [w * 5] * num_rows(LENGTH)) for w, v in zip(weights, vectors)) % GROUP_ORDER
    values, blindings = packing.unpack(total)
    assert np.array_equal(values, sum(w * v for w, v in zip(weights, vectors)))
    assert blindings == [5 * sum(weights)] * num_rows(LENGTH)
    assert packing.to_bytes(total) and packing.from_bytes(packing.to_bytes(total)).tolist() == total.tolist()


def test_equal_example_counts_pack_within_one_and_a_half_times_the_int16_bytes():
    size = 4_718_592
    for n in (4, 8, 16):
        packing = Packing.for_round(size, num_rows(size), BITS, n)  # weights reduce to 1 each
        assert packing.elements * 32 <= 1.5 * 2 * size, (n, packing.slot_bits)


# ------------------------------------------------------------------------------------------------- honest rounds
def test_the_server_gets_the_exact_weighted_sum_and_masked_inputs_unrelated_to_the_updates():
    parties = make_parties(4, examples=[128, 96, 64, 128])
    rnd = run_round(parties)
    assert rnd.weights == {"bank-0": 4, "bank-1": 3, "bank-2": 2, "bank-3": 4}  # counts over their gcd
    aggregate, blindings = rnd.finish()
    expected, expected_blind = rnd.expected(parties)
    assert np.array_equal(aggregate, expected) and blindings == expected_blind
    assert aggregate_opens(aggregate, blindings, commitments_of(rnd, parties), rnd.weights)
    assert not rnd.server.culprits
    for name, p in parties.items():  # what the server saw of each institution
        seen = rnd.packing.from_bytes(rnd.masked[name])
        plain = rnd.packing.pack(rnd.weights[name] * p.values, [0] * num_rows(LENGTH))
        assert not np.any(seen == plain)
        seen_f = np.array([float(v) / GROUP_ORDER for v in seen])
        plain_f = np.array([float(v) / GROUP_ORDER for v in plain])
        # independent samples correlate within a few 1/sqrt(n); 5/sqrt(n) fails a real relation, not chance
        assert abs(np.corrcoef(seen_f, plain_f)[0, 1]) < 5 / np.sqrt(len(seen_f))
        low_bits = np.array([int(v) & 0xFFFF for v in seen[: rnd.packing.value_elements]])
        assert abs(np.corrcoef(low_bits, (p.values[::rnd.packing.slots] & 0xFFFF))[0, 1]) < 5 / np.sqrt(len(low_bits))


def test_a_client_dropping_after_its_masked_input_still_counts():
    parties = make_parties(4, seed=1)
    rnd = run_round(parties)
    gone = "bank-2"
    aggregate, blindings = rnd.finish(responders=[n for n in rnd.survivors if n != gone],
                                      signers=[n for n in rnd.survivors if n != gone])
    assert np.array_equal(aggregate, rnd.expected(parties)[0])
    assert aggregate_opens(aggregate, blindings, commitments_of(rnd, parties), rnd.weights)


def test_a_client_dropping_before_its_masked_input_has_its_pairwise_masks_removed():
    parties = make_parties(4, seed=2)
    rnd = run_round(parties, drop_before_masked=("bank-1",))
    assert rnd.survivors == ["bank-0", "bank-2", "bank-3"]
    aggregate, blindings = rnd.finish()
    alive = rnd.survivors
    assert np.array_equal(aggregate, rnd.expected(alive)[0])
    assert aggregate_opens(aggregate, blindings, commitments_of(rnd, alive), rnd.weights)


def test_more_than_n_minus_t_dropouts_fail_the_round_cleanly():
    parties = make_parties(4, seed=3)
    assert default_threshold(4) == 3
    with pytest.raises(SecAggError, match="threshold is 3: round dropped"):
        run_round(parties, drop_before_masked=("bank-1", "bank-2"))
    rnd = run_round(parties)  # all masked, then two vanish before revealing shares
    with pytest.raises(SecAggError, match="round dropped"):
        rnd.finish(responders=["bank-0", "bank-3"])


# ---------------------------------------------------------------------------------------------- malicious clients
def test_a_masked_vector_that_does_not_match_the_commitment_is_detected():
    parties = make_parties(4, seed=4)

    def other_update(name, weighted, blind):
        if name != "bank-3":
            return weighted, blind
        forged = weighted.copy()
        forged[:10] = 0
        return forged, blind

    rnd = run_round(parties, tamper=other_update)
    aggregate, blindings = rnd.finish()
    assert not aggregate_opens(aggregate, blindings, commitments_of(rnd, parties), rnd.weights)


def test_a_mask_that_does_not_cancel_is_detected():
    parties = make_parties(4, seed=5)
    rnd = run_round(parties)
    noise = mask_vector(b"x" * 32, rnd.packing.elements)
    bad = rnd.parties["bank-0"].client
    vector = (rnd.packing.from_bytes(rnd.server.inputs["bank-0"].vector) + noise) % GROUP_ORDER
    forged = replace(rnd.server.inputs["bank-0"], vector=rnd.packing.to_bytes(vector))
    rnd.server.inputs["bank-0"] = replace(forged, signature=signing.sign(bad.identity, forged.statement(rnd.ctx)))
    with pytest.raises(SecAggError):  # either the sum does not unpack or it does not open the commitments
        aggregate, blindings = rnd.finish()
        assert not aggregate_opens(aggregate, blindings, commitments_of(rnd, parties), rnd.weights)
        raise SecAggError("detected by the commitment check")


def test_a_masked_input_replayed_from_another_round_is_refused_or_detected():
    parties = make_parties(4, seed=6)
    old = run_round(parties, round_num=2)
    old_input = old.server.inputs["bank-1"]
    rnd = run_round(parties, round_num=3)
    server = SecAggServer(rnd.ctx, rnd.server.identities, rnd.server.threshold, rnd.server.ads, rnd.server.bundles)
    others = [rnd.server.inputs[n] for n in ("bank-0", "bank-2", "bank-3")]
    server.collect_masked([*others, old_input], rnd.packing)  # as sent in round 2: its signature is for round 2
    assert server.culprits["bank-1"].startswith(BAD_SIGNATURE)
    # re-signed for round 3 by its (malicious) owner: the round-2 masks do not cancel in round 3
    resigned = replace(old_input, commitments_digest=rnd.server.inputs["bank-1"].commitments_digest)
    resigned = replace(resigned, signature=signing.sign(parties["bank-1"].key, resigned.statement(rnd.ctx)))
    rnd.server.inputs["bank-1"] = resigned
    with pytest.raises(SecAggError):
        aggregate, blindings = rnd.finish()
        assert not aggregate_opens(aggregate, blindings, commitments_of(rnd, parties), rnd.weights)
        raise SecAggError("detected by the commitment check")


def test_a_wrong_share_in_the_unmasking_names_its_sender_and_the_round_still_completes():
    parties = make_parties(4, seed=7)
    rnd = run_round(parties)
    sigs = {n: parties[n].client.sign_survivors(rnd.survivors) for n in rnd.survivors}
    ids = rnd.server.identities
    responses = [parties[n].client.unmask(rnd.survivors, sigs, ids) for n in rnd.survivors]
    liar = responses[1]
    responses[1] = replace(liar, self_mask={k: (v + 1) % GROUP_ORDER for k, v in liar.self_mask.items()})
    aggregate, blindings = rnd.server.unmask(rnd.survivors, responses, rnd.packing)
    assert rnd.server.culprits[liar.name].startswith(BAD_SHARE)
    assert np.array_equal(aggregate, rnd.expected(parties)[0])


def test_a_dealer_who_deals_a_wrong_share_is_named_and_a_false_complaint_names_the_complainer():
    parties = make_parties(4, seed=8)

    def corrupt_one_message(bundle):
        if bundle.name != "bank-0":
            return bundle
        bad = dict(bundle.ciphertexts)
        victim = parties["bank-2"].client
        key = victim._message_key("bank-0", "bank-2", victim._ads["bank-0"])  # the dealer can derive it too
        bad["bank-2"] = ChaCha20Poly1305(key).encrypt(bytes(12), bytes(64), rnd_ctx.tag("share", "bank-0", "bank-2"))
        forged = replace(bundle, ciphertexts=bad)
        return replace(forged, signature=signing.sign(parties["bank-0"].key, forged.statement(rnd_ctx)))

    rnd_ctx = RoundContext("run-secagg", 3)
    rnd = run_round(parties, share_tamper=corrupt_one_message)
    assert rnd.server.culprits == {"bank-0": f"{BAD_SHARE}: its share to bank-2 does not match its commitments"}
    aggregate, _ = rnd.finish()  # three good shares of bank-0's secrets remain
    assert np.array_equal(aggregate, rnd.expected(parties)[0])

    honest = run_round(make_parties(4, seed=9))
    liar = honest.server.inputs["bank-1"]
    complainer = honest.parties["bank-1"].client
    key = complainer._message_key("bank-3", "bank-1", complainer._ads["bank-3"])
    complaint = replace(liar, complaints={"bank-3": key})
    complaint = replace(complaint,
                        signature=signing.sign(honest.parties["bank-1"].key, complaint.statement(honest.ctx)))
    honest.server.collect_masked([complaint], honest.packing)
    assert honest.server.culprits["bank-1"].startswith(FALSE_COMPLAINT)
    assert "bank-3" not in honest.server.culprits


# ----------------------------------------------------------------------------------------------- malicious server
def test_a_client_never_reveals_shares_for_two_survivor_sets():
    parties = make_parties(4, seed=10)
    rnd = run_round(parties)
    ids = rnd.server.identities
    everyone = rnd.survivors
    sigs = {n: parties[n].client.sign_survivors(everyone) for n in everyone}
    first = parties["bank-0"].client.unmask(everyone, sigs, ids)
    assert "bank-3" in first.self_mask and not first.mask_key
    # now the server claims bank-3 dropped, to get its mask-key shares too and strip its masks alone
    fewer = ["bank-0", "bank-1", "bank-2"]
    sigs_fewer = {n: parties[n].client.sign_survivors(fewer) for n in fewer}
    with pytest.raises(SecAggError, match="another survivor set"):
        parties["bank-0"].client.unmask(fewer, sigs_fewer, ids)


def test_a_client_refuses_a_survivor_set_too_few_survivors_signed_and_forged_advertisements():
    parties = make_parties(4, seed=11)
    rnd = run_round(parties)
    ids = rnd.server.identities
    sigs = {n: parties[n].client.sign_survivors(rnd.survivors) for n in rnd.survivors[:2]}
    sigs["bank-3"] = b"\0" * 64
    with pytest.raises(SecAggError, match="2 survivors signed the set, 3 needed"):
        parties["bank-3"].client.unmask(rnd.survivors, sigs, ids)

    _, ctx, clients, ads, ids = advertised(3, seed=12)
    impostor = SecAggClient("bank-1", signing.generate_key(), ctx, 10).advertise()  # the server swaps in its keys
    with pytest.raises(SecAggError, match="bank-1 is not signed by its registered key"):
        clients["bank-0"].share_keys({**ads, "bank-1": impostor}, 2, ids)


@pytest.mark.parametrize("overrides,message", [
    ({"zk.secagg": True, "zk.proof": False, "strategy.min-train-nodes": 3},
     r"zk.secagg \(on by default\) needs zk.proof = true"),
    ({"strategy.min-train-nodes": 2}, r"zk.secagg \(on by default\) needs strategy.min-train-nodes >= 3 \(got 2\)"),
    ({"zk.secagg": True, "strategy.min-train-nodes": 3, "zk.secagg-threshold": 1}, "zk.secagg-threshold = 1"),
    ({"zk.secagg-threshold": -1}, "zk.secagg-threshold"),
])
def test_secure_aggregation_settings_that_cannot_work_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides).check_combinations()


def test_secure_aggregation_is_on_by_default_and_off_only_without_commitments():
    """On by default, for the 3+ institutions it needs; ``zk.enabled = false`` (plaintext float updates, nothing
    committed to check a sum against) is the one setting that turns it off without saying ``zk.secagg = false``."""
    default = load_config()
    assert default.zk.enabled and default.zk.proof and default.zk.secagg
    assert default.strategy.min_train_nodes == default.strategy.min_available_nodes == 3
    assert load_config({"zk.enabled": False, "strategy.min-train-nodes": 2}).zk.secagg is False


def test_a_client_refuses_a_minority_threshold_and_a_server_that_hides_its_honest_peers():
    parties, ctx, clients, ads, ids = advertised(4, seed=13)
    with pytest.raises(SecAggError, match="threshold 2 for 4 clients"):
        clients["bank-0"].share_keys(ads, 2, ids)  # two colluders could then rebuild anyone's secrets
    with pytest.raises(SecAggError, match="below a majority"):
        SecAggServer(ctx, ids, threshold=2).collect_advertisements(ads.values())
    bundles = {n: c.share_keys(ads, 3, ids) for n, c in clients.items()}
    # the server shows bank-0 only itself and one (colluding) peer: masking would leave it exposed
    clients["bank-0"].receive_shares({n: bundles[n] for n in ("bank-0", "bank-1")})
    packing = Packing.for_round(LENGTH, num_rows(LENGTH), BITS, 4)
    with pytest.raises(SecAggError, match="2 clients shared keys, 3 needed"):
        clients["bank-0"].masked_input(parties["bank-0"].values, parties["bank-0"].blindings, packing,
                                       commitments_digest(parties["bank-0"].commitments))


def test_a_client_state_round_trips_between_stages():
    parties, _, clients, ads, ids = advertised(3, seed=14, round_num=2)
    bundles = {n: c.share_keys(ads, 2, ids) for n, c in clients.items()}
    restored = SecAggClient.from_state(clients["bank-1"].to_state(), parties["bank-1"].key)
    restored.receive_shares(bundles)
    clients["bank-1"].receive_shares(bundles)
    assert restored.to_state() == clients["bank-1"].to_state()


def test_a_server_cannot_lower_the_threshold_when_it_asks_for_shares():
    """The malicious server's unmask request names threshold 1 and brings one signature, on a set that leaves out
    bank-1, to get bank-1's mask-key shares while bank-1's masked input is in the sum. The institution's stage
    handler counts signatures against the threshold it dealt its shares with (3), whatever the request says."""
    parties = make_parties(4, seed=15)
    rnd = run_round(parties)
    fewer = ["bank-0", "bank-3"]
    victim = parties["bank-3"]
    state = RecordDict({STATE_RECORD: ConfigRecord({"client": victim.client.to_state(), "blindings": b"",
                                                    "digest": b"", "round": 3})})
    request = {STAGE: UNMASK, "survivors": names_to_bytes(fewer), "threshold": 1,
               "signatures": signatures_to_bytes({"bank-3": victim.client.sign_survivors(fewer)})}
    with pytest.raises(SecAggError, match="1 survivors signed the set, 3 needed"):
        secagg_stage(request, state, victim.key, rnd.server.identities, BITS, False)
