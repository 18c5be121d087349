"""Privacy accounting shared by the institutions (sample-level DP) and the server (client-level DP)."""

from __future__ import annotations

ACCOUNTANTS = ("rdp", "prv")


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a history of ``(noise_multiplier, sample_rate, steps)`` Gaussian releases (Opacus math).

    A fresh Opacus accountant is given the history, so the result depends on nothing but its arguments:
    anyone can recompute a reported epsilon from the numbers in ``metrics.jsonl``.
    """
    from opacus.accountants import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got '{accountant}'")
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))
