"""The server's benchmark evaluation of global adapters (``eval/`` on the in-memory model).

Runs after chosen rounds (``eval.every``) on a subset of tasks and rows, and, with ``eval.final``, once more on
every task and every row after the last round. Results go to ``metrics.jsonl`` (per round) and, in full, to
``<run dir>/eval/round-<k>/`` or ``<run dir>/eval/final/`` (results.json, results.md, results.png, predictions).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finlora.common.adapter import load_lora_state
from finlora.common.config import FinloraConfig
from finlora.common.model import get_model_bundle
from finlora.eval import evaluate_model


def evaluations_due(cfg: FinloraConfig, server_round: int) -> list[tuple[str, str, int]]:
    """``(name, tasks, max_samples)`` of the evaluations to run after this round (none at round 0)."""
    due = []
    if server_round > 0 and cfg.eval.every > 0 and server_round % cfg.eval.every == 0:
        due.append((f"round-{server_round}", cfg.eval.tasks, cfg.eval.max_samples))
    if cfg.eval.final and server_round == cfg.num_rounds:
        due.append(("final", "all", 0))
    return due


def run_benchmark_evals(cfg: FinloraConfig, server_round: int, arrays: Mapping[str, np.ndarray],
                        run_dir: Path) -> dict[str, dict[str, Any]]:
    """Score the round's global adapter as configured; ``{name: {task: result}}`` (empty when none is due)."""
    due = evaluations_due(cfg, server_round)
    if not due:
        return {}

    bundle = get_model_bundle(cfg.model, cfg.lora)
    load_lora_state(bundle.model, arrays)
    out: dict[str, dict[str, Any]] = {}
    for name, tasks, max_samples in due:
        results = evaluate_model(bundle.model, bundle.tokenizer, tasks, cfg.eval.data_dir or None, max_samples,
                                 cfg.eval.mode, cfg.eval.batch_size, out_dir=run_dir / "eval" / name,
                                 progress=False, title=f"{run_dir.name}: {name}")
        out[name] = {task: r.to_json() for task, r in results.items()}
    return out
