"""One façade for an institution's DP-SGD round, the way Opacus's ``PrivacyEngine`` owns its accountant.

A private round is always the same five steps: calibrate sigma once for the whole run's planned steps, authorize
this round's steps against the budget (refusing when they would exceed it), train with DP-SGD, record the steps,
save the ledger. :class:`InstitutionPrivacyEngine` runs them in that order from one entry point
(:meth:`~InstitutionPrivacyEngine.train_round`), so no caller can train without authorizing or forget to save
what was spent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finlora.client.dp_setup import ledger_store, open_ledger
from finlora.client.dp_train import dp_train_round, sample_rate, steps_per_round
from finlora.client.node_settings import NodeSettings
from finlora.client.privacy import PrivacyLedger
from finlora.client.train import TrainStats
from finlora.common.config import FinloraConfig
from finlora.common.data import Example


class InstitutionPrivacyEngine:
    """The ledger of one institution's data (where its node config says), calibrated for the run.

    Parameters
    ----------
    cfg : FinloraConfig
        The run's config (``dp.*``, ``train.*`` and ``num-rounds`` decide sigma and the per-round steps).
    node_config, state
        The Flower node config (a deployed institution's ledger location and budget) and the node's state (a
        simulated institution keeps its ledger there).
    n_examples : int
        Local training examples (the Poisson sampling rate and the default delta depend on it).
    """

    def __init__(self, cfg: FinloraConfig, node_config: Mapping[str, Any] | NodeSettings, state: Any,
                 n_examples: int) -> None:
        self.cfg = cfg
        self.store = ledger_store(cfg.dp, node_config, state)
        self.ledger: PrivacyLedger = open_ledger(cfg.dp, node_config, self.store, n_examples)
        self.sample_rate = sample_rate(n_examples, cfg.train)
        self.steps = steps_per_round(n_examples, cfg.train)
        self.ledger.ensure_calibrated(cfg.dp.epsilon, self.sample_rate, cfg.num_rounds * self.steps)

    def train_round(self, model: Any, examples: Sequence[Example], lr: float, pad_id: int, seed: int,
                    proximal_mu: float = 0.0, global_arrays: Mapping[str, np.ndarray] | None = None) -> TrainStats:
        """Authorize (raises ``PrivacyBudgetExhausted`` before touching the model), train, record, save.
        ``model``'s trainable parameters are what DP-SGD trains: a LoRA adapter's, or a mixture's router's."""
        self.ledger.authorize(self.sample_rate, self.steps)
        stats = dp_train_round(model, examples, self.cfg.train, self.cfg.dp, self.ledger, lr, pad_id, seed,
                               proximal_mu=proximal_mu, global_arrays=global_arrays)
        self.store.save(self.ledger)
        return stats

    def report(self) -> dict[str, float]:
        """What the institution reports to the server about its spend (``dp-epsilon``, ``dp-sigma``, ...)."""
        return self.ledger.report()
