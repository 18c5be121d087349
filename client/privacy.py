"""An institution's privacy ledger: how much (epsilon, delta) its data has spent, kept across rounds and restarts.

Modelled on Opacus's accountants: the whole state is the ``history`` list of ``(noise_multiplier,
sample_rate, steps)``; epsilon is recomputed from it with Opacus's accountant math. That plain state is what
makes persistence trivial: Flower's ``context.state`` in simulation, a JSON file (written atomically) when
deployed, so that restarting a client never resets its spent budget.

The noise multiplier is calibrated once, on the first round the ledger sees, for the planned rounds x local
steps at the planned sampling rate (Opacus ``get_noise_multiplier``), and then kept: the budget of the data
is fixed, and a run longer than planned is refused rather than silently over-spent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finlora.common.dp_accounting import ACCOUNTANTS, epsilon_of
from finlora.common.io import atomic_write_text, cache_root

LEDGER_RECORD = "dp-ledger"
"""Key of the ledger's ConfigRecord in Flower's ``context.state``."""


class PrivacyBudgetExhausted(RuntimeError):
    """Training this round would take the institution past its target epsilon; it refuses to train.

    Raised inside the ClientApp, it reaches the server as an error reply naming this class, which the server
    logs per node and tolerates (the round goes on with the other institutions). The message starts with the
    class name because Flower's simulation engine forwards only the message text, and the server matches on it.
    """

    def __str__(self) -> str:
        return f"{type(self).__name__}: {super().__str__()}"


class PrivacyConfigError(ValueError):
    """The DP settings cannot be satisfied (unknown accountant, delta out of range, no sigma found)."""


CALIBRATION_CACHE = "dp-calibrations.json"
"""A named on-disk cache (under ``$FINLORA_HOME/dp``): calibrated sigma by (accountant, epsilon, delta, rate, steps).
Opacus's binary search costs ~0.5-0.9 s of accountant evaluations; every institution of every run repeats the same
one. A cached sigma is used only after one evaluation (~0.05 s) shows it is what the search itself could return,
epsilon within [target - tolerance, target]: a lowered (tampered) sigma would spend more than the target, so it is
recalibrated, never used."""


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                    cache_dir: Path | None = None) -> float:
    """Sigma that spends ``target_epsilon`` after ``steps`` steps at ``sample_rate`` (tolerance 0.5 %), from
    ``cache_dir/CALIBRATION_CACHE`` when a checked entry is there (default: ``$FINLORA_HOME/dp``)."""
    from opacus.accountants.utils import get_noise_multiplier

    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"dp.accountant must be one of {ACCOUNTANTS}, got '{accountant}'")
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"dp.delta must be in (0, 1), got {delta}")
    tolerance = 0.005 * target_epsilon
    path = Path(cache_dir or cache_root() / "dp") / CALIBRATION_CACHE
    key = json.dumps([accountant, float(target_epsilon), float(delta), float(sample_rate), int(steps)])
    cache = _read_calibrations(path)
    cached = cache.get(key)
    if isinstance(cached, float) and cached > 0:
        spent = epsilon_of([(cached, sample_rate, steps)], delta, accountant)
        if target_epsilon - tolerance <= spent <= target_epsilon:
            return cached
    sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                       steps=steps, accountant=accountant, epsilon_tolerance=tolerance))
    try:
        atomic_write_text(path, json.dumps({**_read_calibrations(path), key: sigma}, indent=1))
    except OSError:
        pass  # a read-only cache only costs the next calibration its search
    return sigma


def _read_calibrations(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class PrivacyLedger:
    """Spent privacy of one institution's data (see the module docstring)."""

    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float = 0.0
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, sample_rate: float, steps: int) -> float:
        return epsilon_of(self.history + [(self.noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def ensure_calibrated(self, planned_epsilon: float, sample_rate: float, planned_steps: int) -> None:
        """Fix sigma, once, so that ``planned_steps`` at ``sample_rate`` spend ``planned_epsilon``."""
        if self.noise_multiplier <= 0:
            self.noise_multiplier = calibrate_noise(planned_epsilon, self.delta, sample_rate, planned_steps,
                                                    self.accountant)

    def authorize(self, sample_rate: float, steps: int) -> None:
        """Refuse (raise) if this round's steps would take the data past its target epsilon."""
        after = self.epsilon_after(sample_rate, steps)
        if after > self.target_epsilon * (1 + 1e-9):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: epsilon spent {self.epsilon():.4f} after {self.steps} steps; this round's "
                f"{steps} steps would reach {after:.4f} > target {self.target_epsilon:.4f} (delta {self.delta:.3g})")

    def record(self, sample_rate: float, steps: int) -> None:
        self.history.append((self.noise_multiplier, sample_rate, steps))

    def report(self) -> dict[str, float]:
        """What the client tells the server every round (``metrics.jsonl`` keeps it per client)."""
        last_rate = self.history[-1][1] if self.history else 0.0
        return {"dp-epsilon": self.epsilon(), "dp-delta": self.delta, "dp-sigma": self.noise_multiplier,
                "dp-sample-rate": last_rate, "dp-steps": self.steps, "dp-target-epsilon": self.target_epsilon}

    # --- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        return cls(target_epsilon=float(data["target_epsilon"]), delta=float(data["delta"]),
                   accountant=str(data["accountant"]), noise_multiplier=float(data["noise_multiplier"]),
                   history=[(float(s), float(q), int(n)) for s, q, n in data["history"]])


class FileLedgerStore:
    """A deployed institution's ledger: one JSON file per private data file, replaced atomically."""

    def __init__(self, state_dir: Path, data_path: str) -> None:
        digest = hashlib.sha256(str(Path(data_path).expanduser().resolve()).encode()).hexdigest()[:16]
        self.path = Path(state_dir) / f"ledger-{digest}.json"

    def load(self) -> PrivacyLedger | None:
        if not self.path.exists():
            return None
        try:
            return PrivacyLedger.from_dict(json.loads(self.path.read_text()))
        except (KeyError, ValueError, TypeError) as exc:
            raise PrivacyConfigError(f"{self.path}: unreadable privacy ledger ({exc}); refusing to start from zero "
                                     f"spend") from exc

    def save(self, ledger: PrivacyLedger) -> None:
        atomic_write_text(self.path, json.dumps(ledger.to_dict(), indent=2) + "\n")


class ContextLedgerStore:
    """A simulated institution's ledger in Flower's per-node ``context.state`` (persists across rounds)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def load(self) -> PrivacyLedger | None:
        if LEDGER_RECORD not in self.state.config_records:
            return None
        rec = self.state.config_records[LEDGER_RECORD]
        return PrivacyLedger.from_dict({"target_epsilon": rec["target-epsilon"], "delta": rec["delta"],
                                        "accountant": rec["accountant"], "noise_multiplier": rec["noise-multiplier"],
                                        "history": list(zip(rec["sigmas"], rec["rates"], rec["steps"]))})

    def save(self, ledger: PrivacyLedger) -> None:
        from flwr.app import ConfigRecord

        self.state[LEDGER_RECORD] = ConfigRecord({
            "target-epsilon": ledger.target_epsilon, "delta": ledger.delta, "accountant": ledger.accountant,
            "noise-multiplier": ledger.noise_multiplier, "sigmas": [float(s) for s, _, _ in ledger.history],
            "rates": [float(q) for _, q, _ in ledger.history], "steps": [int(n) for _, _, n in ledger.history]})
