"""The server optimizer's step (FedAdam / FedYogi), as the audit re-derives it from the committed aggregates.

With a server optimizer the global adapter is no longer ``previous + committed average``: the server takes one
Adam or Yogi step along that average. The server runs Flower's own ``FedAdam``/``FedYogi`` for it; the audit
cannot import Flower (``zk`` is plain Python + crypto), so it recomputes the step here, with the same numpy
operations in the same order, and compares the saved adapter bit for bit. ``tests/test_zk_server_opt.py`` pins
this replica to Flower's classes, so a Flower release that changes the arithmetic fails a test, not an audit.

The moments start at zero and the audit carries them from round to round itself (a kept round leaves them as
they were), so a server that resumed with wrong moments, or stepped with other hyperparameters than the ledger
header states, fails the audit at that round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

NAMES = ("fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """Flower's FedAdam / FedYogi hyperparameters, as the ledger header records them."""

    name: str
    eta: float
    beta_1: float
    beta_2: float
    tau: float

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"server optimizer must be one of {', '.join(NAMES)}, got {self.name!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServerOptimizer:
        return cls(str(data["name"]), float(data["eta"]), float(data["beta_1"]), float(data["beta_2"]),
                   float(data["tau"]))

    def step(self, server_round: int, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
             moments: Moments) -> tuple[dict[str, np.ndarray], Moments]:
        """The adapter after one step from ``current`` along ``averaged - current``, and the new moments: Flower
        1.42's ``FedAdam.aggregate_train`` / ``FedYogi.aggregate_train`` expression by expression, then float32
        (the dtype every adapter is kept in)."""
        delta = {k: x - current[k] for k, x in averaged.items()}
        m_prev = moments.m or {k: np.zeros_like(v) for k, v in averaged.items()}
        m = {k: self.beta_1 * v + (1 - self.beta_1) * delta[k] for k, v in m_prev.items()}
        v_prev = moments.v or {k: np.zeros_like(v) for k, v in averaged.items()}
        if self.name == "fedadam":
            v = {k: self.beta_2 * x + (1 - self.beta_2) * (delta[k] ** 2) for k, x in v_prev.items()}
            eta = (self.eta * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
                   / (1 - np.power(self.beta_1, server_round + 1.0)))
        else:
            v = {k: x - (1.0 - self.beta_2) * (delta[k] ** 2) * np.sign(x - delta[k] ** 2)
                 for k, x in v_prev.items()}
            eta = self.eta
        new = {k: np.asarray(x + eta * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32)
               for k, x in current.items()}
        return new, Moments(m, v)


@dataclass(frozen=True)
class Moments:
    """First and second moments, per tensor (empty before the first aggregated round)."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]

    @classmethod
    def zero(cls) -> Moments:
        return cls({}, {})
