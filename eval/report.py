"""What an evaluation leaves behind: results.json, the markdown table, per-task predictions and a bar chart.

Everything is written atomically (temp file, then rename), so a server that evaluates after a round and a
user who reads the results while it runs never see a half-written file. Predictions keep the raw model output
next to the mapped label so any other scorer can re-score a run without re-running the model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finlora.common.io import atomic_write_jsonl, atomic_write_text

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "results.png"
PREDICTIONS_DIR = "predictions"


def clean_number(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``; other values pass through."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(results: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """One row per task: n, accuracy and F1 in percent, metric, seconds, samples/s, mode, status."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| task | n | accuracy % | F1 % | metric | seconds | samples/s | mode | status |",
              "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for name, r in results.items():
        rate = r.get("samples_per_s")
        lines.append(f"| {name} | {r['n']} | {_pct(r.get('accuracy'))} | {_pct(r.get('f1'))} | {r.get('metric', '')} "
                     f"| {r.get('seconds', 0):.1f} | {'-' if rate is None else f'{rate:.2f}'} | {r['mode']} "
                     f"| {r['status']} |")
    extras = [(name, k, v) for name, r in results.items() for k, v in sorted(r.get("extra", {}).items())
              if v is not None]
    if extras:
        lines += ["", "| task | further metric | value |", "|---|---|---:|"]
        lines += [f"| {name} | {k} | {v if isinstance(v, int) else _pct(v) + ' %'} |" for name, k, v in extras]
    return "\n".join(lines) + "\n"


def write_bar_chart(results: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Accuracy and F1 per task with data as grouped bars (PNG, Agg backend); ``None`` if no task had data."""
    fig = bar_chart_figure(results, title)
    return None if fig is None else save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def bar_chart_figure(results: Mapping[str, Mapping[str, Any]], title: str = "") -> Any:
    """The figure of :func:`write_bar_chart`, every bar labelled with its value (a zero bar is invisible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if r["status"] == "ok"]
    if not names:
        return None
    acc = [results[n].get("accuracy") or 0.0 for n in names]
    f1 = [results[n].get("f1") or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    x = range(len(names))
    for offset, values, label in ((-0.2, acc, "accuracy"), (0.2, f1, "F1 (weighted / text F1)")):
        bars = ax.bar([i + offset for i in x], values, width=0.4, label=label)
        # every bar carries its value, so a zero (an invisible bar) still reads as 0.00
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=7)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.set_title(title or "FinLoRA benchmark")
    ax.legend()
    fig.tight_layout()
    return fig


def write_outputs(results: Mapping[str, Mapping[str, Any]], predictions: Mapping[str, list[dict[str, Any]]],
                  out_dir: Path, title: str = "") -> dict[str, Path]:
    """Write all four outputs under ``out_dir``; returns their paths (the plot only when a task had data)."""
    out_dir = Path(out_dir)
    paths = {"results": out_dir / RESULTS_FILE, "table": out_dir / TABLE_FILE}
    atomic_write_text(paths["results"], json.dumps(results, indent=2, sort_keys=True) + "\n")
    atomic_write_text(paths["table"], markdown_table(results, title))
    for task, rows in predictions.items():
        atomic_write_jsonl(out_dir / PREDICTIONS_DIR / f"{task}.jsonl", rows)
        paths[f"predictions/{task}"] = out_dir / PREDICTIONS_DIR / f"{task}.jsonl"
    plot = write_bar_chart(results, out_dir / PLOT_FILE, title)
    if plot is not None:
        paths["plot"] = plot
    return paths
