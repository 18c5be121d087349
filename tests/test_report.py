"""The end-of-run plots people look at instead of reading tables."""

from __future__ import annotations

import json

from finlora.common.report import privacy_figure, write_privacy_plot


def _records(target: float = 8.0) -> list[dict]:
    """Three institutions on the same plan (identical epsilon curves), two rounds."""
    return [{"round": r, "privacy": {str(node): {"epsilon": 2.5 * r, "target_epsilon": target, "partition_id": pid}
                                     for pid, node in enumerate((11, 12, 13))}} for r in (1, 2)]


def test_identical_privacy_curves_stay_visible_and_the_budget_is_drawn(tmp_path):
    fig = privacy_figure("run", _records())
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "institution 0 (same as 1, 2)" in legend and "budget epsilon = 8" in legend
    curves = [line for line in ax.get_lines() if line.get_label().startswith("institution")]
    assert len({line.get_marker() for line in curves}) == 3  # one marker each
    assert len({tuple(line.get_xdata()) for line in curves}) == 3  # offset, not drawn on top of each other
    budget = [line for line in ax.get_lines() if line.get_label().startswith("budget")]
    assert list(budget[0].get_ydata()) == [8.0, 8.0]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert write_privacy_plot(tmp_path).stat().st_size > 1000


def test_eval_bars_carry_their_values_even_at_zero():
    from finlora.eval.report import bar_chart_figure

    fig = bar_chart_figure({"fpb": {"status": "ok", "accuracy": 0.0, "f1": 0.0},
                            "tfns": {"status": "ok", "accuracy": 0.62, "f1": 0.55}})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("0.00") == 2 and "0.62" in texts and "0.55" in texts
