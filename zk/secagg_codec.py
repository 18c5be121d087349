"""The secure-aggregation wire format: every stage's message as a flat dict of bytes / ints / strings (what a Flower
ConfigRecord holds), encoder and decoder side by side, and a client's between-stage state.

Stages after the training reply (which carries the advertisement in the :data:`zk.codec.ZK_RECORD` record): the
server sends a ``query`` message with the :data:`SECAGG_RECORD` record whose :data:`STAGE` names one of
:data:`STAGES`; the client answers in the same record. Names live here only; ``zk`` stays free of Flower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from finlora.zk.secagg import (SECRETS, Advertisement, MaskedInput, ShareBundle, UnmaskResponse, ads_from_json,
                               ads_to_json)

SECAGG_RECORD = "secagg"
QUERY_ACTION = "secagg"
"""The ClientApp's ``@app.query("secagg")`` handler; the server sends message type ``query.secagg``."""

STAGE = "stage"
SHARE, MASK, SIGN, UNMASK = "share", "mask", "sign-survivors", "unmask"
STAGES = (SHARE, MASK, SIGN, UNMASK)

# advertisement fields, carried in the training reply's zk record
CIPHER_KEY, MASK_KEY, AD_SIGNATURE = "secagg_cipher_key", "secagg_mask_key", "secagg_signature"
AD_FIELDS = (CIPHER_KEY, MASK_KEY, AD_SIGNATURE)


def _pack_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _unpack_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(bytes(data).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"secagg {what}: not valid JSON ({exc})") from exc


def _hexmap(d: Mapping[str, bytes]) -> dict[str, str]:
    return {k: bytes(v).hex() for k, v in d.items()}


def _bytesmap(d: Any, what: str) -> dict[str, bytes]:
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise ValueError(f"secagg {what}: expected an object of hex strings")
    return {k: bytes.fromhex(v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- advertisement
def ad_fields(ad: Advertisement) -> dict[str, bytes]:
    return {CIPHER_KEY: ad.cipher_key, MASK_KEY: ad.mask_key, AD_SIGNATURE: ad.signature}


def ad_from_fields(name: str, num_examples: int, fields: Mapping[str, Any]) -> Advertisement:
    return Advertisement(str(name), bytes(fields[CIPHER_KEY]), bytes(fields[MASK_KEY]), int(num_examples),
                         bytes(fields[AD_SIGNATURE]))


def ads_to_bytes(ads: Mapping[str, Advertisement]) -> bytes:
    return _pack_json(ads_to_json(ads))


def ads_from_bytes(data: bytes) -> dict[str, Advertisement]:
    try:
        return ads_from_json(_unpack_json(data, "advertisements"))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"secagg advertisements: {exc}") from exc


# ------------------------------------------------------------------------------------------- share bundles
def bundle_to_bytes(bundle: ShareBundle) -> bytes:
    return _pack_json({"name": bundle.name, "signature": bundle.signature.hex(),
                       "commitments": {k: [c.hex() for c in v] for k, v in bundle.commitments.items()},
                       "ciphertexts": _hexmap(bundle.ciphertexts)})


def bundle_from_bytes(data: bytes) -> ShareBundle:
    raw = _unpack_json(data, "share bundle")
    try:
        commitments = {str(k): tuple(bytes.fromhex(c) for c in raw["commitments"][k]) for k in SECRETS}
        return ShareBundle(str(raw["name"]), commitments, _bytesmap(raw["ciphertexts"], "ciphertexts"),
                           bytes.fromhex(raw["signature"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"secagg share bundle: {exc}") from exc


def bundles_to_bytes(bundles: Mapping[str, ShareBundle]) -> bytes:
    return _pack_json({n: bundle_to_bytes(b).decode() for n, b in bundles.items()})


def bundles_from_bytes(data: bytes) -> dict[str, ShareBundle]:
    raw = _unpack_json(data, "share bundles")
    if not isinstance(raw, dict):
        raise ValueError("secagg share bundles: expected an object")
    return {str(n): bundle_from_bytes(str(b).encode()) for n, b in raw.items()}


# ------------------------------------------------------------------------------------------- masked input
def masked_fields(item: MaskedInput) -> dict[str, Any]:
    return {"name": item.name, "vector": item.vector, "commitments_digest": item.commitments_digest,
            "complaints": _pack_json(_hexmap(item.complaints)), "signature": item.signature}


def masked_from_fields(fields: Mapping[str, Any]) -> MaskedInput:
    try:
        return MaskedInput(str(fields["name"]), bytes(fields["vector"]), bytes(fields["commitments_digest"]),
                           _bytesmap(_unpack_json(fields["complaints"], "complaints"), "complaints"),
                           bytes(fields["signature"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"secagg masked input: missing or wrong field ({exc})") from exc


# ------------------------------------------------------------------------------------------- unmasking
def unmask_to_bytes(resp: UnmaskResponse) -> bytes:
    return _pack_json({"name": resp.name, "self_mask": {k: hex(v) for k, v in resp.self_mask.items()},
                       "mask_key": {k: hex(v) for k, v in resp.mask_key.items()}})


def unmask_from_bytes(data: bytes) -> UnmaskResponse:
    raw = _unpack_json(data, "unmask response")
    try:
        return UnmaskResponse(str(raw["name"]), {str(k): int(v, 16) for k, v in raw["self_mask"].items()},
                              {str(k): int(v, 16) for k, v in raw["mask_key"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"secagg unmask response: {exc}") from exc


def signatures_to_bytes(signatures: Mapping[str, bytes]) -> bytes:
    return _pack_json(_hexmap(signatures))


def signatures_from_bytes(data: bytes) -> dict[str, bytes]:
    return _bytesmap(_unpack_json(data, "survivor signatures"), "survivor signatures")


def names_to_bytes(names: list[str]) -> bytes:
    return _pack_json(sorted(names))


def names_from_bytes(data: bytes) -> list[str]:
    raw = _unpack_json(data, "names")
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ValueError("secagg names: expected a list of strings")
    return raw
