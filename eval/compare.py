"""Several models on the same tasks and rows, side by side: a mixture of experts against each of its experts and
against one multi-task adapter (``finlora moe compare``), or any other set of candidates.

Each candidate is scored by :func:`eval.runner.evaluate_model` into its own folder (its results.json, table,
chart and predictions, as ``finlora eval`` writes them), loaded one at a time so only one model is in memory.
Then one comparison: ``comparison.json`` (candidate -> task -> result), ``comparison.md`` (a task per row, a
candidate per column, the task's accuracy and F1 in percent, the best of each row in bold) and ``comparison.png``
(grouped bars per task). The per-task rows are the same for every candidate (seeded sampling), so the columns
are comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finlora.common.io import atomic_write_text
from finlora.eval.report import clean_number, save_figure
from finlora.eval.runner import evaluate_model

COMPARISON_JSON = "comparison.json"
COMPARISON_TABLE = "comparison.md"
COMPARISON_PLOT = "comparison.png"

Loader = Callable[[], tuple[Any, Any]]
"""Loads one candidate: (model, tokenizer)."""


def _score(result: Mapping[str, Any]) -> float | None:
    """The number a row is ranked by: F1 where the task has one (FinLoRA reports weighted F1), else accuracy."""
    value = result.get("f1")
    return result.get("accuracy") if value is None else value


def _summary(result: Any) -> dict[str, Any]:
    return {"n": result.n, "accuracy": clean_number(result.accuracy), "f1": clean_number(result.f1),
            "metric": result.metric, "status": result.status}


def compare_models(candidates: Mapping[str, Loader], tasks: list[str], data_dir: str | None, max_samples: int,
                   mode: str, batch_size: int, out_dir: Path, progress: bool = True,
                   title: str = "") -> dict[str, dict[str, dict[str, Any]]]:
    """Score every candidate on ``tasks`` (same rows for all) and write the comparison under ``out_dir``."""
    out_dir = Path(out_dir)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (name, load) in enumerate(candidates.items(), start=1):
        print(f"[{i}/{len(candidates)}] {name}", flush=True)
        model, tokenizer = load()
        results = evaluate_model(model, tokenizer, tasks, data_dir, max_samples, mode, batch_size,
                                 out_dir / name, progress=progress, title=name)
        table[name] = {task: _summary(r) for task, r in results.items()}
        del model
    atomic_write_text(out_dir / COMPARISON_JSON, json.dumps(table, indent=2) + "\n")  # candidates in order
    atomic_write_text(out_dir / COMPARISON_TABLE, comparison_markdown(table, title))
    write_comparison_chart(table, out_dir / COMPARISON_PLOT, title)
    return table


def comparison_markdown(table: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "") -> str:
    """A task per row, a candidate per column: ``F1 / accuracy`` in percent, the row's best score in bold."""
    names = list(table)
    tasks = list(next(iter(table.values()), {}))
    lines = [f"# {title}", ""] if title else []
    lines += ["| task | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    wins = dict.fromkeys(names, 0)
    for task in tasks:
        cells = [table[n].get(task, {}) for n in names]
        scores = [_score(c) if c.get("status") == "ok" else None for c in cells]
        best = max((s for s in scores if s is not None), default=None)
        row = []
        for name, cell, score in zip(names, cells, scores):
            if score is None:
                row.append("-")
                continue
            text = f"{_pct(cell.get('f1'))} / {_pct(cell.get('accuracy'))}"
            if score == best:
                text, wins[name] = f"**{text}**", wins[name] + 1
            row.append(text)
        n = max((c.get("n", 0) for c in cells), default=0)
        lines.append(f"| {task} | {n} | " + " | ".join(row) + " |")
    lines += ["", "Cells: F1 % / accuracy % (F1: weighted for classification, text F1 for open answers); bold: the "
                  "row's best F1 (accuracy where a task has no F1).",
              "Best on: " + ", ".join(f"{n} {w}" for n, w in wins.items())]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_comparison_chart(table: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path,
                           title: str = "") -> Path | None:
    """Grouped bars: per task, one bar per candidate (its ranking score); ``None`` when no task had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    tasks = [t for t in next(iter(table.values()), {}) if any(table[n][t].get("status") == "ok" for n in names)]
    if not tasks:
        return None
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4))
    for k, name in enumerate(names):
        values = [(_score(table[name][t]) or 0.0) if table[name][t].get("status") == "ok" else 0.0 for t in tasks]
        bars = ax.bar([i - 0.4 + width * (k + 0.5) for i in range(len(tasks))], values, width=width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=6)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("F1 (accuracy where no F1)")
    ax.set_title(title or "FinLoRA benchmark: candidates side by side")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
