"""The Fiat–Shamir transcript every zk proof runs over.

Why one running hash over everything: a challenge that leaves out part of the statement or an earlier prover
message lets a cheating prover pick that part after seeing the challenge (the "frozen heart" bug class). So the
transcript starts with the protocol's name, the public parameters and the whole statement, absorbs every prover
message in order, and absorbs each challenge it hands out; every absorption is framed with a label and a length,
so two different message sequences can never hash the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from py_arkworks_bls12381 import G1Point

from finlora.zk.commit import GROUP_ORDER, SCALAR_BYTES


def _frame(label: bytes, data: bytes) -> bytes:
    return len(label).to_bytes(2, "big") + label + len(data).to_bytes(8, "big") + data


class Transcript:
    """SHA-256 chain: state_{i+1} = SHA-256(state_i || framed message); challenges are SHA-512 output mod r.

    A 512-bit hash reduced mod the 255-bit group order is within 2^-257 of uniform, so challenges are unbiased
    for every purpose here.
    """

    def __init__(self, protocol: bytes) -> None:
        self._state = hashlib.sha256(_frame(b"protocol", protocol)).digest()

    def absorb(self, label: bytes, data: bytes) -> None:
        self._state = hashlib.sha256(self._state + _frame(label, data)).digest()

    def absorb_int(self, label: bytes, value: int) -> None:
        if value < 0:
            raise ValueError(f"{label!r}: negative integer {value}")
        self.absorb(label, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))

    def absorb_scalar(self, label: bytes, value: int) -> None:
        self.absorb(label, (value % GROUP_ORDER).to_bytes(SCALAR_BYTES, "little"))

    def absorb_points(self, label: bytes, points: Iterable[G1Point]) -> None:
        self.absorb(label, b"".join(p.to_compressed_bytes() for p in points))

    def challenge(self, label: bytes) -> int:
        """A field element derived from everything absorbed so far; the challenge is absorbed too."""
        out = hashlib.sha512(self._state + _frame(b"challenge", label)).digest()
        value = int.from_bytes(out, "little") % GROUP_ORDER
        self.absorb_scalar(b"challenge/" + label, value)
        return value

    def challenges(self, label: bytes, count: int) -> list[int]:
        return [self.challenge(label + b"/" + i.to_bytes(4, "big")) for i in range(count)]
