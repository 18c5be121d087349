"""Which privacy ledger and budget an institution uses, and the institution's own DP policy.

The server is not trusted with an institution's privacy: a deployed institution (``data-path`` in its node config)
keeps its policy in its node config, which only it controls (``finlora client`` writes it): DP required
(``dp-required``, on unless ``--allow-no-dp``), its largest epsilon (``dp-epsilon``), delta (``dp-delta``) and
clipping norm (``dp-max-grad-norm``), and where its ledger lives (``dp-state-dir``). The run config may ask for
*more* privacy, never less: a run config that asks for less is refused before any training, naming the key, and the
ledger is left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finlora.client.node_settings import NodeSettings
from finlora.client.privacy import ContextLedgerStore, FileLedgerStore, PrivacyConfigError, PrivacyLedger
from finlora.common.config import DpConfig, pyproject_defaults
from finlora.common.io import cache_root


class PrivacyPolicyViolation(RuntimeError):
    """The run config asks for less privacy than the institution's own policy allows; the institution refuses.

    Like :class:`~client.privacy.PrivacyBudgetExhausted`, the message starts with the class name because Flower's
    simulation engine forwards only the message text, and the server logs it per node.
    """

    def __str__(self) -> str:
        return f"{type(self).__name__}: {super().__str__()}"


def enforce_policy(dp: DpConfig, node_config: Mapping[str, Any] | NodeSettings, n_examples: int) -> None:
    """Refuse (raise :class:`PrivacyPolicyViolation`) a run config that asks a deployed institution for less privacy
    than its node config allows. Simulated institutions follow the run config (one user plays every party)."""
    node = NodeSettings.parse(node_config)
    if not node.deployed:
        return
    required = node.dp_required
    if required and not dp.enabled:
        raise PrivacyPolicyViolation("run config dp.enabled = false, but this institution requires DP-SGD on its "
                                     "data (node config dp-required; start the client with --allow-no-dp to allow)")
    if not dp.enabled:
        return
    if required and dp.level != "sample":
        raise PrivacyPolicyViolation(f"run config dp.level = {dp.level}: server-added noise protects nothing from "
                                     f"the server; this institution requires dp.level = sample (node config "
                                     f"dp-required)")
    max_epsilon = node.dp_epsilon or float(pyproject_defaults()["dp.epsilon"])
    if dp.epsilon > max_epsilon * (1 + 1e-9):
        raise PrivacyPolicyViolation(f"run config dp.epsilon = {dp.epsilon:g} exceeds this institution's maximum "
                                     f"{max_epsilon:g} (node config dp-epsilon)")
    max_delta = node.dp_delta
    delta = dp.delta if dp.delta > 0 else 1.0 / (10 * n_examples)
    if max_delta is not None and delta > max_delta * (1 + 1e-9):
        raise PrivacyPolicyViolation(f"run config dp.delta = {delta:.3g} exceeds this institution's maximum "
                                     f"{max_delta:.3g} (node config dp-delta)")
    max_clip = node.dp_max_grad_norm
    if max_clip is not None and dp.max_grad_norm > max_clip * (1 + 1e-9):
        raise PrivacyPolicyViolation(f"run config dp.max-grad-norm = {dp.max_grad_norm:g} exceeds this "
                                     f"institution's maximum {max_clip:g} (node config dp-max-grad-norm)")


def own_budget(dp: DpConfig, node_config: Mapping[str, Any] | NodeSettings) -> float:
    """The institution's target epsilon: its node config's ``dp-epsilon``, its entry in
    ``dp.client-epsilons`` (simulation, by partition id), else the federation's ``dp.epsilon``."""
    node = NodeSettings.parse(node_config)
    if node.dp_epsilon is not None:
        return node.dp_epsilon
    if node.deployed:
        return min(dp.epsilon, float(pyproject_defaults()["dp.epsilon"]))
    if dp.client_epsilons.strip():
        values = [v.strip() for v in dp.client_epsilons.split(",")]
        pid = node.partition_id
        if pid < len(values) and values[pid]:
            try:
                return float(values[pid])
            except ValueError as exc:
                raise PrivacyConfigError(f"dp.client-epsilons: '{values[pid]}' (partition {pid}) is not a "
                                         f"number") from exc
    return dp.epsilon


def ledger_dir(configured: str | Path | None = None) -> Path:
    """Where a deployed institution's ledgers live: its own setting (node config ``dp-state-dir``, ``finlora client
    --dp-ledger-dir``), else ``$FINLORA_DP_STATE``, else ``$FINLORA_HOME/dp-state``."""
    return Path(str(configured or "") or os.environ.get("FINLORA_DP_STATE", "") or cache_root() / "dp-state")


def ledger_store(dp: DpConfig, node_config: Mapping[str, Any] | NodeSettings,
                 state: Any) -> FileLedgerStore | ContextLedgerStore:
    """A deployed institution keeps its ledger in a file keyed by its data file, in the directory its own node
    config names (``dp-state-dir``), else ``$FINLORA_DP_STATE`` or ``$FINLORA_HOME/dp-state``: never where the run
    config says, so a server cannot point it at a fresh, unspent ledger. A simulated one uses ``context.state``."""
    node = NodeSettings.parse(node_config)
    if node.deployed:
        return FileLedgerStore(ledger_dir(node.dp_state_dir), node.data_path)
    return ContextLedgerStore(state)


def start_new_period(data_path: str | Path, directory: Path) -> Path | None:
    """Close the privacy-budget period of ``data_path``: its ledger is renamed (kept, never deleted) to
    ``ledger-<key>.period-<UTC time>.json`` and the next run starts at zero spend. This is the institution's
    deliberate decision (e.g. a new budget year, or new data); nothing else resets a ledger. Returns the archive,
    or ``None`` when nothing was spent yet."""
    import time

    store = FileLedgerStore(directory, str(data_path))
    if not store.path.exists():
        return None
    store.load()  # an unreadable ledger is reported, not archived blindly
    archive = store.path.with_name(f"{store.path.stem}.period-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    if archive.exists():
        raise FileExistsError(f"{archive} exists already (one new period per second at most)")
    store.path.rename(archive)
    return archive


def open_ledger(dp: DpConfig, node_config: Mapping[str, Any] | NodeSettings, store: Any,
                n_examples: int) -> PrivacyLedger:
    """The stored ledger (its history and sigma kept), with the current budget; or a new one."""
    ledger = store.load()
    delta = dp.delta if dp.delta > 0 else 1.0 / (10 * n_examples)
    budget = own_budget(dp, node_config)
    if ledger is None:
        return PrivacyLedger(target_epsilon=budget, delta=delta, accountant=dp.accountant)
    ledger.target_epsilon = budget  # the budget is policy; the spent history is fact and is never dropped
    return ledger
