"""What the institution's ClientApp last did, so that ``finlora client`` knows when the federation's run is over.

Flower never tells a SuperNode that a run has finished: it keeps polling a SuperLink that the operator has already
stopped. The ClientApp therefore records, after every task, the run, the round and whether that was the run's last
message for this institution (the last round's training when the run does no federated evaluation, else the last
round's evaluation) in the file its node config names (``progress-file``); ``finlora client`` stops its SuperNode
once that reply has been sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finlora.common.io import atomic_write_text

def record_task(path: str, run_config: Mapping[str, Any], run_id: int, kind: str, config: Mapping[str, Any]) -> None:
    """Record a finished ``train`` / ``evaluate`` task in ``path`` (the node config's ``progress-file``, set by
    ``finlora client``; no-op when empty, as in simulation)."""
    if not path or "server-round" not in config:
        return
    server_round, num_rounds = int(config["server-round"]), int(config.get("num-rounds", 0) or 0)
    evaluates = float(run_config.get("strategy.fraction-evaluate", 0.0) or 0.0) > 0
    final = num_rounds > 0 and server_round >= num_rounds and (kind == "evaluate" or not evaluates)
    atomic_write_text(Path(path), json.dumps({"run_id": int(run_id), "kind": kind, "round": server_round,
                                              "num_rounds": num_rounds, "final": final, "at": time.time()}) + "\n")


def read_progress(path: Path) -> dict[str, Any] | None:
    """The last recorded task, or ``None`` (no task yet, or a file being replaced)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
