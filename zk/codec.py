"""The zk wire format of one update: how a committed, signed, quantized update is laid out in a reply, with the
institution's encoder and the server's decoder side by side.

A reply carries two records: an array record of integer tensors keyed by the adapter's PEFT names (the quantized
delta, int8/int16: see :func:`zk.wire.values_to_wire`), and a config record named :data:`ZK_RECORD` holding the
fields below (bytes and ints). The functions here work on plain dicts so that ``zk`` stays free of Flower; each
side converts those dicts to and from Flower records in one line. Record and field names live here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from finlora.zk.encoding import Layout
from finlora.zk.verify import Submission
from finlora.zk.wire import pack_commitments, unpack_commitments

ZK_RECORD = "zk"
"""Name of the config record of a zk reply."""

INSTITUTION = "institution"
NUM_EXAMPLES = "num_examples"
COMMITMENTS = "commitments"
BLINDINGS = "blindings"
SIGNATURE = "signature"
PROOF = "proof"
FIELDS = (INSTITUTION, NUM_EXAMPLES, COMMITMENTS, BLINDINGS, SIGNATURE, PROOF)
"""Every field of :data:`ZK_RECORD`."""


def encode(sub: Submission, layout: Layout, bits: int, institution: str) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, Any]]:
    """(integer tensors by PEFT name, fields of the :data:`ZK_RECORD` record) of a submission."""
    wire = sub.to_wire(bits)
    ints = wire.pop("values")
    tensors = {key: np.ascontiguousarray(ints[sl].reshape(shape)) for key, shape, sl in layout.slices()}
    return tensors, {INSTITUTION: institution, **wire}


def decode(tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], layout: Layout) -> tuple[str, Submission]:
    """(claimed institution, submission) from a reply's integer tensors and :data:`ZK_RECORD` fields.

    Raises ``KeyError``/``ValueError``/``TypeError`` on a reply that does not parse (missing field, other tensor
    keys than the global adapter's, bytes of the wrong length); whether it *verifies* is for
    :func:`zk.verify.verify_round`.
    """
    if set(tensors) != set(layout.keys):
        raise ValueError(f"update keys differ from the global adapter's ({len(tensors)} vs {len(layout.keys)} "
                         f"tensors)")
    institution = str(fields[INSTITUTION])
    record = {"values": layout.flatten(dict(tensors)), NUM_EXAMPLES: fields[NUM_EXAMPLES],
              COMMITMENTS: fields[COMMITMENTS], BLINDINGS: fields[BLINDINGS], SIGNATURE: fields[SIGNATURE],
              PROOF: fields.get(PROOF, b"")}
    return institution, Submission.from_wire(institution, record)


def encode_committed(sub: Submission, institution: str, ad_fields: Mapping[str, bytes]) -> dict[str, Any]:
    """Secure aggregation's training reply: the :data:`ZK_RECORD` fields without values or blindings (those reach
    the server only masked), plus the round's advertisement (:mod:`zk.secagg_codec`)."""
    return {INSTITUTION: institution, NUM_EXAMPLES: int(sub.num_examples),
            COMMITMENTS: pack_commitments(sub.commitments), SIGNATURE: bytes(sub.signature),
            PROOF: bytes(sub.proof), **{k: bytes(v) for k, v in ad_fields.items()}}


def decode_committed(fields: Mapping[str, Any]) -> tuple[str, Submission]:
    """(claimed institution, submission with no values and no blindings) from a secure-aggregation reply; raises
    ``KeyError``/``ValueError``/``TypeError`` on one that does not parse. The advertisement is read with
    :func:`zk.secagg_codec.ad_from_fields`."""
    if fields.get(BLINDINGS):
        raise ValueError("a secure-aggregation reply must not carry blindings")
    institution = str(fields[INSTITUTION])
    return institution, Submission(institution, int(fields[NUM_EXAMPLES]), np.zeros(0, dtype=np.int64), (),
                                   tuple(unpack_commitments(fields[COMMITMENTS])), bytes(fields[SIGNATURE]),
                                   bytes(fields.get(PROOF, b"")))
