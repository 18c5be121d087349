"""Which privacy ledger and budget an institution uses, from the run config and its node config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.privacy import ContextLedgerStore, FileLedgerStore, PrivacyConfigError, PrivacyLedger
from common.config import DpConfig
from common.tiny import cache_root


def own_budget(dp: DpConfig, node_config: Mapping[str, Any]) -> float:
    """The institution's target epsilon: its node config's ``dp-epsilon``, its entry in
    ``dp.client-epsilons`` (simulation, by partition id), else the federation's ``dp.epsilon``."""
    if "dp-epsilon" in node_config:
        return float(node_config["dp-epsilon"])
    if dp.client_epsilons.strip():
        values = [v.strip() for v in dp.client_epsilons.split(",")]
        pid = int(node_config.get("partition-id", 0))
        if pid < len(values) and values[pid]:
            try:
                return float(values[pid])
            except ValueError as exc:
                raise PrivacyConfigError(f"dp.client-epsilons: '{values[pid]}' (partition {pid}) is not a "
                                         f"number") from exc
    return dp.epsilon


def ledger_store(dp: DpConfig, node_config: Mapping[str, Any], state: Any) -> FileLedgerStore | ContextLedgerStore:
    """A deployed institution (``data-path`` in its node config) keeps its ledger in a file beside its data's
    identity, so a restart or a new run cannot reset the spend; a simulated one uses ``context.state``."""
    data_path = str(node_config.get("data-path", "") or "")
    if data_path:
        state_dir = Path(dp.state_dir or os.environ.get("FINLORA_DP_STATE", "") or cache_root() / "dp-state")
        return FileLedgerStore(state_dir, data_path)
    return ContextLedgerStore(state)


def open_ledger(dp: DpConfig, node_config: Mapping[str, Any], store: Any, n_examples: int) -> PrivacyLedger:
    """The stored ledger (its history and sigma kept), with the current budget; or a new one."""
    ledger = store.load()
    delta = dp.delta if dp.delta > 0 else 1.0 / (10 * n_examples)
    budget = own_budget(dp, node_config)
    if ledger is None:
        return PrivacyLedger(target_epsilon=budget, delta=delta, accountant=dp.accountant)
    ledger.target_epsilon = budget  # the budget is policy; the spent history is fact and is never dropped
    return ledger
