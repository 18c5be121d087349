"""Secure aggregation of committed updates: the server learns sum_i w_i x_i and the summed row blindings, never
one institution's x_i, and checks that sum against the weighted row commitments.

The protocol is Bonawitz et al.'s (CCS 2017) over the complete graph of one round's institutions, with the
dropout handling of SecAgg+ (Bell et al., CCS 2020): pairwise masks from X25519 key agreement, a self mask, and
t-of-n Shamir shares of the self-mask seed and of the pairwise-mask key, so the server can remove the masks of
whoever drops. Four choices differ from Flower's SecAgg+ and are why this is not built on it:

* **The field.** Masks live in the BLS12-381 scalar field (the commitments' field), drawn from ChaCha20 by
  rejection sampling (exactly uniform, no modulo bias; full 256-bit keys, never a 32-bit seed). Several
  fixed-point values are packed into one field element (``Packing``), so a masked update costs ~1.3-1.8x the
  int16 bytes instead of 16x.
* **Binding to the proofs.** The unmasked sum A and blindings R must satisfy Com(A_row; R_row) = sum_i w_i C_i,row
  for every row: the round then aggregates exactly the committed (and range/norm-proven) updates. A client whose
  masked vector does not match its commitment, or whose mask does not cancel, makes this check fail; the round is
  rejected, and since the server only ever unmasks the sum, no honest update is revealed.
* **Verifiable shares.** Shares carry Feldman commitments to the sharing polynomial (signed by the dealer), so a
  wrong share is caught and its sender named; a recipient who got a wrong share proves it by revealing that one
  message's key.
* **Consistency.** Before anyone reveals shares, every survivor signs the survivor set; a client reveals shares
  only for a set that at least ``threshold`` survivors signed, and never self-mask shares of a client it was told
  dropped (or the reverse), so a server cannot unmask one institution by telling clients different stories.

See docs/zk.md ("Secure aggregation") for the statement and the argument.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from py_arkworks_bls12381 import G1Point

from finlora.zk import signing
from finlora.zk.commit import GROUP_ORDER, SCALAR_BYTES, OpeningTerms, decode_points, opening_terms, rows_of, to_scalar
from finlora.zk.wire import pack_scalars, unpack_scalars

PROTOCOL = b"finlora-secagg/v1"
PACK_BITS = 254
"""Bits of a field element the packing may fill: 2^254 < r, so a packed sum never wraps."""
_LOW255 = (1 << 255) - 1

# Reasons a client is named; each starts with one of these, then ": " and a detail.
BAD_SIGNATURE = "secagg-bad-signature"
MALFORMED = "secagg-malformed"
BAD_SHARE = "secagg-bad-share"
FALSE_COMPLAINT = "secagg-false-complaint"
REFUSED = "secagg-refused"


class SecAggError(ValueError):
    """The round cannot produce a checked aggregate; ``culprits`` names who caused it where that is known."""

    def __init__(self, message: str, culprits: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.culprits = dict(culprits or {})


def _frame(*parts: bytes | str | int) -> bytes:
    out = bytearray()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part.to_bytes(8, "big") if isinstance(part, int) else part
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


@dataclass(frozen=True)
class RoundContext:
    """What every key, mask, share and signature of one secure-aggregation round is bound to: a mask or signature
    from another run or round never cancels or verifies here."""

    run_id: str
    round_num: int

    def tag(self, label: str, *parts: bytes | str | int) -> bytes:
        return _frame(PROTOCOL, self.run_id, int(self.round_num), label, *parts)


# ---------------------------------------------------------------------------------------------------- field PRG
def field_stream(key: bytes, count: int) -> list[int]:
    """``count`` field elements, exactly uniform mod r, from the ChaCha20 keystream of a 256-bit ``key``.

    Each candidate is 32 keystream bytes with the top bit cleared (uniform below 2^255) and is kept only when it is
    below r (probability r / 2^255 ~ 0.91): rejection sampling, so no value is likelier than another.
    """
    if len(key) != 32:
        raise ValueError("the PRG key must be 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    out: list[int] = []
    while len(out) < count:
        need = count - len(out)
        block = encryptor.update(bytes(SCALAR_BYTES * (need + need // 8 + 16)))
        words = (int.from_bytes(block[i:i + SCALAR_BYTES], "little") & _LOW255
                 for i in range(0, len(block), SCALAR_BYTES))
        out.extend(w for w in words if w < GROUP_ORDER)
    return out[:count]


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_vector(key: bytes, count: int) -> np.ndarray:
    return np.array(field_stream(key, count), dtype=object)


# ------------------------------------------------------------------------------------------------------ packing
@dataclass(frozen=True)
class Packing:
    """How a weighted integer update and its weighted row blindings become field elements.

    ``slots`` signed values of ``slot_bits`` bits share one element (Horner in base 2^slot_bits), then one element
    per row blinding. ``slot_bits`` fits the largest possible aggregate coordinate, total_weight * 2^(bits-1), so
    the unmasked sum of the packed vectors unpacks to the exact integer sum. Everyone derives it from public
    numbers (the length, the value bits and the round's signed weights).
    """

    length: int
    rows: int
    slot_bits: int

    @classmethod
    def for_round(cls, length: int, rows: int, value_bits: int, total_weight: int) -> Packing:
        if length <= 0 or rows <= 0 or total_weight <= 0:
            raise ValueError("length, rows and total weight must be positive")
        slot_bits = value_bits + int(total_weight).bit_length() + 1
        if slot_bits > PACK_BITS:
            raise ValueError(f"total weight {total_weight} too large to pack")
        return cls(int(length), int(rows), slot_bits)

    @property
    def slots(self) -> int:
        return PACK_BITS // self.slot_bits

    @property
    def value_elements(self) -> int:
        return -(-self.length // self.slots)

    @property
    def elements(self) -> int:
        return self.value_elements + self.rows

    def pack(self, weighted: np.ndarray, weighted_blindings: Sequence[int]) -> np.ndarray:
        """Object array of field elements: sum_s v_{k*slots+s} 2^(s*slot_bits) mod r, then the blindings."""
        if weighted.shape != (self.length,) or len(weighted_blindings) != self.rows:
            raise ValueError(f"packing expects {self.length} values and {self.rows} blindings")
        padded = np.zeros(self.value_elements * self.slots, dtype=np.int64)
        padded[: self.length] = weighted
        mat = padded.reshape(self.value_elements, self.slots)
        acc = mat[:, -1].astype(object)
        for s in range(self.slots - 2, -1, -1):
            acc = (acc << self.slot_bits) + mat[:, s].astype(object)
        tail = np.array([int(b) for b in weighted_blindings], dtype=object)
        return np.concatenate([acc % GROUP_ORDER, tail % GROUP_ORDER])

    def unpack(self, total: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(the int64 aggregate, the summed row blindings) from the unmasked sum; raises SecAggError when a packed
        element is out of the range an honest sum can reach (then some input or mask was not what it claimed)."""
        offset = sum(1 << (self.slot_bits * s + self.slot_bits - 1) for s in range(self.slots))
        shifted = (total[: self.value_elements] + offset) % GROUP_ORDER
        if any(v >> (self.slot_bits * self.slots) for v in shifted):
            raise SecAggError("the unmasked sum is not a packed sum of in-range updates")
        digit_mask, half = (1 << self.slot_bits) - 1, 1 << (self.slot_bits - 1)
        cols = [((shifted >> (self.slot_bits * s)) & digit_mask).astype(np.int64) - half for s in range(self.slots)]
        values = np.stack(cols, axis=1).reshape(-1)[: self.length]
        return values, [int(v) for v in total[self.value_elements:]]

    def to_bytes(self, vector: np.ndarray) -> bytes:
        return pack_scalars(vector.tolist(), "a masked vector")

    def from_bytes(self, data: bytes) -> np.ndarray:
        if len(data) != self.elements * SCALAR_BYTES:
            raise ValueError(f"{len(data)} bytes, expected {self.elements} field elements")
        vals = unpack_scalars(data, "a masked vector")
        if any(v >= GROUP_ORDER for v in vals):
            raise ValueError("a field element is not reduced mod r")
        return np.array(vals, dtype=object)


def round_weights(ads: Mapping[str, Advertisement], equal: bool = False) -> dict[str, int]:
    """Each advertised client's FedAvg weight for the round (the same on every client and on the server): its
    signed example count over the gcd of all of them, or 1 each with ``strategy.weighting = equal``."""
    names = sorted(ads)
    return dict(zip(names, [1] * len(names) if equal else reduced_weights([ads[n].num_examples for n in names])))


def reduced_weights(num_examples: Sequence[int]) -> list[int]:
    """FedAvg weights divided by their gcd: the same averages, and a smaller total weight packs more values per
    field element (equal counts give weight 1 each)."""
    g = reduce(math.gcd, [int(n) for n in num_examples])
    return [int(n) // g for n in num_examples]


# -------------------------------------------------------------------------------------------- Shamir + Feldman
FELDMAN_BASE = G1Point()
"""The group's standard generator: Feldman commitments a_k * G to the sharing polynomial's coefficients."""


@dataclass(frozen=True)
class Sharing:
    """Shares f(x) for x in ``xs`` of a degree threshold-1 polynomial with f(0) = secret, and its Feldman
    commitments (compressed a_k * G)."""

    shares: dict[int, int]
    commitments: tuple[bytes, ...]


def shamir_share(secret: int, threshold: int, xs: Iterable[int]) -> Sharing:
    coeffs = [secret % GROUP_ORDER] + [secrets.randbelow(GROUP_ORDER) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % GROUP_ORDER
        shares[int(x)] = acc
    return Sharing(shares, tuple((FELDMAN_BASE * to_scalar(c)).to_compressed_bytes() for c in coeffs))


def share_valid(x: int, share: int, commitments: Sequence[bytes]) -> bool:
    """Whether share = f(x) for the polynomial committed to: share * G == sum_k x^k A_k."""
    if not 0 <= share < GROUP_ORDER:
        return False
    try:
        points = decode_points(commitments)
    except ValueError:
        return False
    powers = [to_scalar(pow(x, k, GROUP_ORDER)) for k in range(len(points))]
    return FELDMAN_BASE * to_scalar(share) == G1Point.multiexp_unchecked(points, powers)


def reconstruct(shares: Mapping[int, int]) -> int:
    """f(0) by Lagrange interpolation over the given points."""
    total = 0
    for i, yi in shares.items():
        num, den = 1, 1
        for j in shares:
            if j != i:
                num = num * (-j) % GROUP_ORDER
                den = den * (i - j) % GROUP_ORDER
        total = (total + yi * num * pow(den, -1, GROUP_ORDER)) % GROUP_ORDER
    return total


def _secret_valid(secret: int, commitments: Sequence[bytes]) -> bool:
    return (FELDMAN_BASE * to_scalar(secret)).to_compressed_bytes() == bytes(commitments[0])


# ------------------------------------------------------------------------------------------------------ messages
def _raw(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Advertisement:
    """Stage 1, client -> everyone: this round's ephemeral public keys and the client's signed example count."""

    name: str
    cipher_key: bytes
    mask_key: bytes
    num_examples: int
    signature: bytes

    def statement(self, ctx: RoundContext) -> bytes:
        return ctx.tag("advertise", self.name, self.cipher_key, self.mask_key, int(self.num_examples))


def ads_to_json(ads: Mapping[str, Advertisement]) -> dict[str, list]:
    """Advertisements as plain JSON values (the server's broadcast and a client's saved state)."""
    return {n: [a.cipher_key.hex(), a.mask_key.hex(), int(a.num_examples), a.signature.hex()] for n, a in ads.items()}


def ads_from_json(raw: Mapping[str, list]) -> dict[str, Advertisement]:
    return {str(n): Advertisement(str(n), bytes.fromhex(c), bytes.fromhex(m), int(k), bytes.fromhex(sig))
            for n, (c, m, k, sig) in raw.items()}


SECRETS = ("self-mask", "mask-key")
"""What every client Shamir-shares: its self-mask seed and its pairwise-mask X25519 key, each a uniform field element
(the X25519 key is that element's 32 bytes). Full-size secrets matter: Feldman publishes secret * G, and a secret
from a small range (a 128-bit half of a key, say) could be recovered from it by a kangaroo search."""


@dataclass(frozen=True)
class ShareBundle:
    """Stage 2, client -> server: Feldman commitments of its three sharings and one encrypted share message per
    recipient (only the recipient can read it), all signed."""

    name: str
    commitments: dict[str, tuple[bytes, ...]]
    ciphertexts: dict[str, bytes]

    signature: bytes = b""

    def statement(self, ctx: RoundContext) -> bytes:
        parts: list[bytes | str] = []
        for label in SECRETS:
            parts += [label, *self.commitments[label]]
        for receiver in sorted(self.ciphertexts):
            parts += [receiver, hashlib.sha256(self.ciphertexts[receiver]).digest()]
        return ctx.tag("shares", self.name, *parts)


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, client -> server: the masked packed update, the commitments digest it is bound to, complaints
    against dealers whose share failed (with the message key that proves it), all signed."""

    name: str
    vector: bytes
    commitments_digest: bytes
    complaints: dict[str, bytes] = field(default_factory=dict)
    signature: bytes = b""

    def statement(self, ctx: RoundContext) -> bytes:
        complaints = [x for d in sorted(self.complaints) for x in (d, self.complaints[d])]
        return ctx.tag("masked", self.name, hashlib.sha256(self.vector).digest(), self.commitments_digest,
                       *complaints)


def survivors_statement(ctx: RoundContext, survivors: Iterable[str]) -> bytes:
    return ctx.tag("survivors", *sorted(survivors))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 5, client -> server: its shares of the survivors' self-mask seeds and of the dropped clients'
    pairwise-mask keys (never both for one client)."""

    name: str
    self_mask: dict[str, int]
    mask_key: dict[str, int]


def _share_values(data: bytes) -> list[int]:
    if len(data) != SCALAR_BYTES * len(SECRETS):
        raise ValueError("share message of the wrong length")
    return unpack_scalars(data, "a share message")


def shamir_points(names: Iterable[str]) -> dict[str, int]:
    """Each advertised client's Shamir x-coordinate: its 1-based position in sorted name order."""
    return {name: i + 1 for i, name in enumerate(sorted(names))}


def min_threshold(n: int) -> int:
    """The least threshold a client accepts: a majority (and at least 2), so two different survivor sets can never
    both be signed by enough honest clients, whatever the server asks for."""
    return max(2, n // 2 + 1)


def _mask_key(secret: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(int(secret).to_bytes(32, "little"))


def default_threshold(n: int) -> int:
    """floor(2n/3) + 1, at least 2: more than half (two survivor sets cannot both get enough honest signatures)
    and tolerant of n - t dropouts."""
    return min(n, max(2, 2 * n // 3 + 1))


def pair_sign(me: str, other: str) -> int:
    return 1 if me < other else -1


# -------------------------------------------------------------------------------------------------------- client
class SecAggClient:
    """One institution's side of one round. It keeps its secrets and what it already revealed, and refuses any
    request that would let the server remove its masks while its input is in the sum."""

    def __init__(self, name: str, identity: Ed25519PrivateKey, ctx: RoundContext, num_examples: int) -> None:
        self.name, self.identity, self.ctx, self.num_examples = name, identity, ctx, int(num_examples)
        self._cipher = X25519PrivateKey.generate()
        self._mask_secret = secrets.randbelow(GROUP_ORDER)
        self._mask = _mask_key(self._mask_secret)
        self._self_seed = secrets.randbelow(GROUP_ORDER)
        self._threshold = 0
        self._ads: dict[str, Advertisement] = {}
        self._received: dict[str, list[int]] = {}
        self._bundles: dict[str, ShareBundle] = {}
        self._answered: tuple[str, ...] | None = None
        self._dealers: tuple[str, ...] = ()
        self.complaints: dict[str, bytes] = {}

    def to_state(self) -> bytes:
        """Everything this round's client must remember between stages (its ephemeral secrets included), for the
        institution's own node state; never sent to the server."""
        return json.dumps({"name": self.name, "run_id": self.ctx.run_id, "round": self.ctx.round_num,
                           "num_examples": self.num_examples, "cipher": _raw(self._cipher).hex(),
                           "mask": hex(self._mask_secret), "seed": hex(self._self_seed), "ads": ads_to_json(self._ads),
                           "threshold": self._threshold,
                           "received": {n: [hex(v) for v in vals] for n, vals in self._received.items()},
                           "dealers": list(self._dealers), "answered": self._answered,
                           "complaints": {n: k.hex() for n, k in self.complaints.items()}}).encode()

    @classmethod
    def from_state(cls, data: bytes, identity: Ed25519PrivateKey) -> SecAggClient:
        raw = json.loads(bytes(data).decode())
        client = cls(raw["name"], identity, RoundContext(raw["run_id"], int(raw["round"])), int(raw["num_examples"]))
        client._cipher = X25519PrivateKey.from_private_bytes(bytes.fromhex(raw["cipher"]))
        client._mask_secret = int(raw["mask"], 16)
        client._mask = _mask_key(client._mask_secret)
        client._threshold = int(raw["threshold"])
        client._self_seed = int(raw["seed"], 16)
        client._ads = ads_from_json(raw["ads"])
        client._received = {n: [int(v, 16) for v in vals] for n, vals in raw["received"].items()}
        client._dealers = tuple(raw["dealers"])
        client._answered = None if raw["answered"] is None else tuple(raw["answered"])
        client.complaints = {n: bytes.fromhex(k) for n, k in raw["complaints"].items()}
        return client

    @property
    def advertised(self) -> dict[str, Advertisement]:
        """The advertisements this client checked and shared with (stage 2)."""
        return dict(self._ads)

    def advertise(self) -> Advertisement:
        cipher, mask = _raw(self._cipher.public_key()), _raw(self._mask.public_key())
        ad = Advertisement(self.name, cipher, mask, self.num_examples, b"")
        return Advertisement(self.name, cipher, mask, self.num_examples,
                             signing.sign(self.identity, ad.statement(self.ctx)))

    def _message_key(self, sender: str, receiver: str, peer: Advertisement) -> bytes:
        shared = self._cipher.exchange(X25519PublicKey.from_public_bytes(peer.cipher_key))
        return _hkdf(shared, self.ctx.tag("share-key", sender, receiver))

    def share_keys(self, ads: Mapping[str, Advertisement], threshold: int,
                   identities: Mapping[str, Ed25519PublicKey]) -> ShareBundle:
        """Check every peer's advertisement signature, then share the three secrets among all advertised clients."""
        for name, ad in ads.items():
            key = identities.get(name)
            if ad.name != name or key is None or not signing.verify(key, ad.statement(self.ctx), ad.signature):
                raise SecAggError(f"{REFUSED}: advertisement of {name} is not signed by its registered key")
        if self.name not in ads or not min_threshold(len(ads)) <= threshold <= len(ads):
            raise SecAggError(f"{REFUSED}: threshold {threshold} for {len(ads)} clients (at least "
                              f"{min_threshold(len(ads))}: a majority)")
        self._ads, self._threshold = dict(ads), int(threshold)
        points = shamir_points(ads)
        sharings = dict(zip(SECRETS, (shamir_share(v, threshold, points.values()) for v in
                                      (self._self_seed, self._mask_secret))))
        ciphertexts = {}
        for receiver, x in points.items():
            key = self._message_key(self.name, receiver, ads[receiver])
            plain = pack_scalars([sharings[label].shares[x] for label in SECRETS], "shares")
            ciphertexts[receiver] = ChaCha20Poly1305(key).encrypt(bytes(12), plain, self.ctx.tag("share", self.name,
                                                                                               receiver))
        bundle = ShareBundle(self.name, {label: s.commitments for label, s in sharings.items()}, ciphertexts)
        return ShareBundle(bundle.name, bundle.commitments, bundle.ciphertexts,
                           signing.sign(self.identity, bundle.statement(self.ctx)))

    def receive_shares(self, bundles: Mapping[str, ShareBundle]) -> None:
        """Decrypt and check (Feldman) the share each dealer sent this client; a bad one becomes a complaint that
        reveals that message's key, so the server can see for itself who cheated."""
        x = shamir_points(self._ads)[self.name]
        self._dealers = tuple(sorted(d for d in bundles if d in self._ads))
        for dealer, bundle in bundles.items():
            if dealer not in self._ads or self.name not in bundle.ciphertexts:
                continue
            key = self._message_key(dealer, self.name, self._ads[dealer])
            try:
                values = _share_values(ChaCha20Poly1305(key).decrypt(
                    bytes(12), bundle.ciphertexts[self.name], self.ctx.tag("share", dealer, self.name)))
                ok = all(share_valid(x, v, bundle.commitments[label]) for label, v in zip(SECRETS, values))
            except (InvalidTag, ValueError, KeyError):
                ok = False
            if ok:
                self._received[dealer], self._bundles[dealer] = values, bundle
            else:
                self.complaints[dealer] = key

    def masked_input(self, weighted: np.ndarray, weighted_blindings: Sequence[int], packing: Packing,
                     commitments_digest: bytes) -> MaskedInput:
        """pack(w x, w r) + PRG(self seed) + sum_j +-PRG(s_ij) mod r, over every peer that shared (the server's
        routed set U2: the same set on both ends of every pair, so the pairwise masks cancel)."""
        if self.name not in self._dealers or len(self._dealers) < self._threshold:
            # fewer peers than t would let a server that controls the rest strip every pairwise mask of ours
            raise SecAggError(f"{REFUSED}: {len(self._dealers)} clients shared keys, {self._threshold} needed")
        vector = packing.pack(weighted, weighted_blindings)
        vector = vector + mask_vector(_hkdf(self._self_seed.to_bytes(SCALAR_BYTES, "big"),
                                            self.ctx.tag("self-mask", self.name)), packing.elements)
        for peer in self._dealers:
            if peer == self.name:
                continue
            seed = pair_seed(self.ctx, self._mask, self.name, peer, self._ads[peer].mask_key)
            term = mask_vector(seed, packing.elements)
            vector = vector + term if pair_sign(self.name, peer) > 0 else vector - term
        data = packing.to_bytes(vector % GROUP_ORDER)
        unsigned = MaskedInput(self.name, data, commitments_digest, dict(self.complaints))
        return MaskedInput(self.name, data, commitments_digest, dict(self.complaints),
                           signing.sign(self.identity, unsigned.statement(self.ctx)))

    def sign_survivors(self, survivors: Sequence[str]) -> bytes:
        if self.name not in survivors:
            raise SecAggError(f"{REFUSED}: {self.name} is not in the survivor set it is asked to sign")
        return signing.sign(self.identity, survivors_statement(self.ctx, survivors))

    def unmask(self, survivors: Sequence[str], signatures: Mapping[str, bytes],
               identities: Mapping[str, Ed25519PublicKey]) -> UnmaskResponse:
        """Reveal self-mask shares of ``survivors`` and mask-key shares of the clients that shared but did not
        survive, only if at least t survivors signed this exact set (t: the threshold this client shared with,
        never one the server names now) and it was not answered differently before."""
        threshold = self._threshold
        survivors = tuple(sorted(set(survivors)))
        if self._answered is not None and self._answered != survivors:
            raise SecAggError(f"{REFUSED}: already revealed shares for another survivor set this round")
        if self.name not in survivors or not set(survivors) <= set(self._ads):
            raise SecAggError(f"{REFUSED}: survivor set {survivors} does not fit the round")
        statement = survivors_statement(self.ctx, survivors)
        valid = {n for n, sig in signatures.items()
                 if n in survivors and n in identities and signing.verify(identities[n], statement, sig)}
        if len(valid) < threshold:
            raise SecAggError(f"{REFUSED}: {len(valid)} survivors signed the set, {threshold} needed")
        self._answered = survivors
        self_mask = {n: v[0] for n, v in self._received.items() if n in survivors}
        mask_key = {n: v[1] for n, v in self._received.items() if n not in survivors}
        return UnmaskResponse(self.name, self_mask, mask_key)


def pair_seed(ctx: RoundContext, mine: X25519PrivateKey, me: str, other: str, other_mask_key: bytes) -> bytes:
    """The PRG key two clients share: HKDF over their X25519 secret, bound to the round and the (ordered) pair."""
    shared = mine.exchange(X25519PublicKey.from_public_bytes(other_mask_key))
    low, high = sorted((me, other))
    return _hkdf(shared, ctx.tag("pair", low, high))



# -------------------------------------------------------------------------------------------------------- server
@dataclass
class SecAggServer:
    """The server's side of one round: it routes, checks signatures and shares, and unmasks only the sum.

    Every problem it can pin on one client lands in ``culprits`` (name -> reason); the round goes on as long as
    ``threshold`` clients remain at every stage, and otherwise raises :class:`SecAggError`.
    """

    ctx: RoundContext
    identities: Mapping[str, Ed25519PublicKey]
    threshold: int | None = None
    ads: dict[str, Advertisement] = field(default_factory=dict)
    bundles: dict[str, ShareBundle] = field(default_factory=dict)
    inputs: dict[str, MaskedInput] = field(default_factory=dict)
    culprits: dict[str, str] = field(default_factory=dict)

    def _enough(self, count: int, stage: str) -> None:
        if self.threshold is not None and count < self.threshold:
            raise SecAggError(f"only {count} clients {stage}, the threshold is {self.threshold}: round dropped",
                              self.culprits)

    def collect_advertisements(self, ads: Iterable[Advertisement]) -> dict[str, Advertisement]:
        """Stage 1: keep the advertisements signed by their registered key; fixes the threshold if unset."""
        for ad in ads:
            key = self.identities.get(ad.name)
            if key is None or not signing.verify(key, ad.statement(self.ctx), ad.signature):
                self.culprits[ad.name] = f"{BAD_SIGNATURE}: advertisement not signed by its registered key"
            elif not 0 < int(ad.num_examples) <= 1 << 31 or len(ad.cipher_key) != 32 or len(ad.mask_key) != 32:
                self.culprits[ad.name] = f"{MALFORMED}: advertisement keys or example count"
            else:
                self.ads[ad.name] = ad
        if self.threshold is None:
            self.threshold = default_threshold(len(self.ads))
        elif self.threshold < min_threshold(len(self.ads)):
            raise SecAggError(f"zk.secagg-threshold = {self.threshold} is below a majority of the {len(self.ads)} "
                              f"institutions ({min_threshold(len(self.ads))}); they would refuse it", self.culprits)
        self._enough(len(self.ads), "advertised keys")
        return dict(self.ads)

    def weights(self, equal: bool = False) -> dict[str, int]:
        """Each advertised client's FedAvg weight (:func:`round_weights`)."""
        return round_weights(self.ads, equal)

    def route_shares(self, bundles: Iterable[ShareBundle]) -> dict[str, dict[str, ShareBundle]]:
        """Stage 2: keep the signed, well-formed bundles (U2); each recipient gets every kept bundle."""
        names = set(self.ads)
        for bundle in bundles:
            ad = self.ads.get(bundle.name)
            if ad is None:
                continue
            if not signing.verify(self.identities[bundle.name], bundle.statement(self.ctx), bundle.signature):
                self.culprits[bundle.name] = f"{BAD_SIGNATURE}: share bundle"
            elif set(bundle.ciphertexts) != names or set(bundle.commitments) != set(SECRETS) or any(
                    len(c) != self.threshold for c in bundle.commitments.values()):
                self.culprits[bundle.name] = (f"{MALFORMED}: share bundle must hold one message per client and "
                                              f"{self.threshold} commitments per secret")
            else:
                self.bundles[bundle.name] = bundle
        self._enough(len(self.bundles), "shared their keys")
        return {receiver: dict(self.bundles) for receiver in self.bundles}

    def _judge(self, complainer: str, dealer: str, key: bytes) -> None:
        """A complaint reveals one message key. If the dealer's signed message decrypts under it, the key is the one
        the dealer encrypted with (AEAD), so what it holds is the dealer's doing: wrong shares name the dealer,
        right ones the complainer. A key that does not open the message names the complainer."""
        bundle = self.bundles.get(dealer)
        if bundle is None or complainer not in bundle.ciphertexts:
            return
        x = shamir_points(self.ads)[complainer]
        try:
            plain = ChaCha20Poly1305(bytes(key)).decrypt(bytes(12), bundle.ciphertexts[complainer],
                                                         self.ctx.tag("share", dealer, complainer))
        except (InvalidTag, ValueError):
            self.culprits.setdefault(complainer, f"{FALSE_COMPLAINT}: the revealed key does not open {dealer}'s "
                                                 f"message")
            return
        try:
            values = _share_values(plain)
            valid = all(share_valid(x, v, bundle.commitments[label]) for label, v in zip(SECRETS, values))
        except ValueError:
            valid = False
        if valid:
            self.culprits.setdefault(complainer, f"{FALSE_COMPLAINT}: {dealer}'s share to it is valid")
        else:
            self.culprits[dealer] = f"{BAD_SHARE}: its share to {complainer} does not match its commitments"

    def collect_masked(self, inputs: Iterable[MaskedInput], packing: Packing) -> list[str]:
        """Stage 3: keep signed masked inputs of the right size from clients in U2; judge complaints. Returns the
        survivor set U3 (sorted)."""
        for item in inputs:
            if item.name not in self.bundles:
                continue
            if not signing.verify(self.identities[item.name], item.statement(self.ctx), item.signature):
                self.culprits[item.name] = f"{BAD_SIGNATURE}: masked input not signed for this run and round"
                continue
            if len(item.vector) != packing.elements * SCALAR_BYTES:
                self.culprits[item.name] = f"{MALFORMED}: masked input of {len(item.vector)} bytes, expected " \
                                           f"{packing.elements * SCALAR_BYTES}"
                continue
            self.inputs[item.name] = item
            for dealer, key in item.complaints.items():
                self._judge(item.name, dealer, key)
        survivors = sorted(self.inputs)
        self._enough(len(survivors), "sent masked inputs")
        return survivors

    def unmask(self, survivors: Sequence[str], responses: Iterable[UnmaskResponse], packing: Packing
               ) -> tuple[np.ndarray, list[int]]:
        """Stage 5: check every revealed share against its dealer's commitments (a bad one names its sender and is
        dropped), rebuild the survivors' self-mask seeds and the dropped clients' mask keys from ``threshold``
        good shares each, remove all masks from the sum, and unpack it: (aggregate, summed row blindings)."""
        points = shamir_points(self.ads)
        dropped = sorted(set(self.bundles) - set(survivors))
        seeds: dict[str, dict[int, int]] = {n: {} for n in survivors}
        keys: dict[str, dict[int, int]] = {n: {} for n in dropped}
        for resp in responses:
            if resp.name not in survivors:
                continue
            x = points[resp.name]
            for owner, share in resp.self_mask.items():
                if owner in seeds and share_valid(x, share, self.bundles[owner].commitments["self-mask"]):
                    seeds[owner][x] = share
                elif owner in seeds:
                    self.culprits[resp.name] = f"{BAD_SHARE}: its share of {owner}'s self-mask seed is wrong"
            for owner, share in resp.mask_key.items():
                commitments = self.bundles[owner].commitments if owner in keys else None
                if commitments and share_valid(x, share, commitments["mask-key"]):
                    keys[owner][x] = share
                elif commitments:
                    self.culprits[resp.name] = f"{BAD_SHARE}: its share of {owner}'s mask key is wrong"
        total = sum((packing.from_bytes(self.inputs[n].vector) for n in survivors),
                    np.zeros(packing.elements, dtype=object))
        for owner, shares in seeds.items():
            seed = self._rebuild(owner, shares, "self-mask")
            total = total - mask_vector(_hkdf(seed.to_bytes(SCALAR_BYTES, "big"), self.ctx.tag("self-mask", owner)),
                                        packing.elements)
        for owner, shares in keys.items():
            key = _mask_key(self._rebuild(owner, shares, "mask-key"))
            for survivor in survivors:  # survivor added sign(survivor, owner) * PRG(seed): take it out
                term = mask_vector(pair_seed(self.ctx, key, owner, survivor, self.ads[survivor].mask_key),
                                   packing.elements)
                total = total - term if pair_sign(survivor, owner) > 0 else total + term
        return packing.unpack(total % GROUP_ORDER)

    def _rebuild(self, owner: str, shares: Mapping[int, int], label: str) -> int:
        commitments = self.bundles[owner].commitments[label]
        if len(shares) < (self.threshold or 0):
            raise SecAggError(f"only {len(shares)} valid shares of {owner}'s {label}, {self.threshold} needed: "
                              f"round dropped", self.culprits)
        secret = reconstruct(dict(list(shares.items())[: self.threshold]))
        if not _secret_valid(secret, commitments):
            raise SecAggError(f"{owner}'s {label} does not rebuild to its committed value", self.culprits)
        return secret


def aggregate_opens(aggregate: np.ndarray, blindings: Sequence[int], commitments: Mapping[str, Sequence[bytes]],
                    weights: Mapping[str, int]) -> bool:
    """Whether Com(A_row; R_row) == sum_i w_i C_i,row for every row (one batched check, random 128-bit weights).

    This is what ties the unmasked sum to the committed, proven updates: by binding, it holds only if A is the
    weighted sum of the committed vectors."""
    names = sorted(commitments)
    points = {n: decode_points(commitments[n]) for n in names}
    rows = rows_of(np.asarray(aggregate, dtype=np.int64))
    groups = [[(points[n][k], int(weights[n])) for n in names] for k in range(len(rows))]
    terms: OpeningTerms = opening_terms(groups, rows, list(blindings))
    return terms.holds()
