"""The end-of-run summary: a table on the terminal, ``summary.json`` and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finlora.common.io import atomic_write_text, read_jsonl_records
from finlora.common.moe import ROUTER_FILE
from finlora.eval.report import markdown_table


def round_problems(run_dir: Path, num_rounds: int) -> list[str]:
    """Why the run is not complete: missing rounds in ``metrics.jsonl`` or missing adapter files."""
    records = {int(r["round"]): r for r in read_jsonl_records(run_dir / "metrics.jsonl")}
    problems = []
    missing = [k for k in range(num_rounds + 1) if k not in records]
    if missing:
        problems.append(f"rounds {missing} are missing from {run_dir / 'metrics.jsonl'}")
    for k in range(1, num_rounds + 1):
        saved = (run_dir / f"round-{k}" / name for name in ("adapter_model.safetensors", ROUTER_FILE))
        if not any(path.is_file() for path in saved):
            problems.append(f"round {k} has no saved adapter (or router)")
    return problems


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"round": r["round"], "train_loss": r.get("train_loss"), "heldout_loss": r.get("heldout_loss"),
             "federated_eval_loss": r.get("federated_eval_loss"), "seconds": r.get("seconds"),
             "clients": r.get("num_clients"), "bytes_sent_per_client": r.get("bytes_sent_per_client"),
             "rejected": len(r.get("rejected") or {}), "errors": len(r.get("errors") or {}),
             "kept_previous": r.get("kept_previous") or ""} for r in sorted(records, key=lambda r: r["round"])]


def zk_proof_costs(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean prove seconds (institutions' own report), verify seconds (the server's) and proof bytes per accepted
    client and round; empty when the run made no zero-knowledge proofs."""
    prove = [c["zk_prove_seconds"] for r in records for c in (r.get("clients") or {}).values()
             if "zk_prove_seconds" in c]
    size = [c["zk_proof_bytes"] for r in records for c in (r.get("clients") or {}).values() if "zk_proof_bytes" in c]
    verify = [s for r in records for s in (r.get("zk_verify_seconds") or {}).values()]
    if not prove or not verify:
        return {}
    return {"proofs": len(verify), "prove_seconds": sum(prove) / len(prove),
            "verify_seconds": sum(verify) / len(verify), "proof_bytes": sum(size) / max(1, len(size))}


def print_summary(run_dir: Path) -> None:
    """Print the per-round table and write ``summary.json`` beside ``metrics.jsonl``."""
    rows = summary_rows(read_jsonl_records(run_dir / "metrics.jsonl"))
    atomic_write_text(run_dir / "summary.json", json.dumps(rows, indent=2) + "\n")
    header = f"{'round':>5}  {'train loss':>10}  {'held-out loss':>13}  {'fed. eval':>9}  {'seconds':>7}  " \
             f"{'clients':>7}  {'bytes sent/client':>17}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['round']:>5}  {_fmt(r['train_loss'], '.4f'):>10}  {_fmt(r['heldout_loss'], '.4f'):>13}  "
              f"{_fmt(r['federated_eval_loss'], '.4f'):>9}  {_fmt(r['seconds'], '.1f'):>7}  "
              f"{r['clients']:>7}  {_fmt(r['bytes_sent_per_client'], ',.0f'):>17}")
    bits = sorted({int(c["base_quantization_bits"]) for r in read_jsonl_records(run_dir / "metrics.jsonl")
                   for c in (r.get("clients") or {}).values() if "base_quantization_bits" in c})
    if bits:
        print("base model really loaded as: " + ", ".join(f"{b}-bit (bitsandbytes)" if b else "unquantized float"
                                                          for b in bits))
    proofs = zk_proof_costs(read_jsonl_records(run_dir / "metrics.jsonl"))
    if proofs:
        print(f"zk range/norm proofs: {proofs['proofs']} verified; per client and round: prove "
              f"{proofs['prove_seconds']:.2f} s, verify {proofs['verify_seconds']:.2f} s, "
              f"{proofs['proof_bytes']:,.0f} bytes")
    for r in rows:
        if r["rejected"] or r["errors"] or r["kept_previous"]:
            print(f"round {r['round']}: {r['rejected']} update(s) rejected, {r['errors']} institution(s) failed"
                  f"{'; ' + r['kept_previous'] if r['kept_previous'] else ''} (reasons in metrics.jsonl)")
    print()


def print_eval(run_dir: Path) -> None:
    """The benchmark table of the last evaluation in the run (the final one when there is one)."""
    evaluated = [(r["round"], name, results) for r in sorted(read_jsonl_records(run_dir / "metrics.jsonl"),
                                                             key=lambda r: r["round"])
                 for name, results in (r.get("eval") or {}).items()]
    if not evaluated:
        return
    final = [e for e in evaluated if e[1] == "final"]
    server_round, name, results = (final or evaluated)[-1]
    print(markdown_table(results, title=f"benchmark evaluation of the global adapter after round {server_round} "
                                        f"({name}; full results in {run_dir / 'eval' / name})"))


def privacy_by_partition(records: list[dict[str, Any]]) -> dict[int, dict[int, float]]:
    """{partition id: {round: epsilon spent so far}} from the per-client privacy objects."""
    table: dict[int, dict[int, float]] = {}
    for r in records:
        for p in (r.get("privacy") or {}).values():
            table.setdefault(int(p["partition_id"]), {})[int(r["round"])] = float(p["epsilon"])
    return table


def print_privacy(run_dir: Path) -> None:
    """Epsilon spent per institution per round (sample-level DP), and refusals; or the client-level guarantee."""
    records = sorted(read_jsonl_records(run_dir / "metrics.jsonl"), key=lambda r: r["round"])
    table = privacy_by_partition(records)
    if table:
        rounds = [r["round"] for r in records if r["round"] > 0]
        print("epsilon spent (sample-level DP, per institution)")
        print("institution " + " ".join(f"{'round ' + str(k):>9}" for k in rounds))
        for pid in sorted(table):
            print(f"{pid:>11} " + " ".join(f"{_fmt(table[pid].get(k), '.3f'):>9}" for k in rounds))
        refused = [(r["round"], len(r.get("refused") or [])) for r in records if r.get("refused")]
        if refused:
            print("refused (budget exhausted): " + ", ".join(f"round {k}: {n}" for k, n in refused))
        print()
    last = records[-1].get("client_level_privacy") if records else None
    if last:
        print(f"client-level DP: epsilon {_fmt(last['epsilon'], '.3f')} at delta {last['delta']:.3g} "
              f"after {last['rounds']} rounds (noise multiplier {last['sigma']}, "
              f"clipping norm {last['clipping_norm']})\n")


def write_privacy_plot(run_dir: Path) -> Path | None:
    """``privacy.png``: epsilon spent per institution against the round, with each budget as a dashed line.

    Institutions on the same plan spend the same epsilon, so their lines coincide: each line gets its own marker
    and a small horizontal offset, and the legend says which institutions share a curve.
    """
    fig = privacy_figure(run_dir.name, read_jsonl_records(run_dir / "metrics.jsonl"))
    return None if fig is None else _save(fig, run_dir / "privacy.png")


def privacy_figure(title: str, records: list[dict[str, Any]]) -> Any:
    """The figure of :func:`write_privacy_plot` (``None`` without sample-level privacy records)."""
    table = privacy_by_partition(records)
    if not table:
        return None
    budgets = sorted({round(float(p["target_epsilon"]), 6) for r in records for p in (r.get("privacy") or {}).values()
                      if p.get("target_epsilon") is not None})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "osD^vP*X"
    same: dict[tuple, list[int]] = {}
    for pid in sorted(table):
        same.setdefault(tuple(sorted(table[pid].items())), []).append(pid)
    width = 0.08 * (len(table) - 1)
    for i, pid in enumerate(sorted(table)):
        shift = (i * 0.08 - width / 2) if len(table) > 1 else 0.0
        curve = tuple(sorted(table[pid].items()))
        twins = [q for q in same[curve] if q != pid]
        label = f"institution {pid}" + (f" (same as {', '.join(map(str, twins))})" if twins else "")
        ax.plot([x + shift for x in table[pid]], list(table[pid].values()), marker=markers[i % len(markers)],
                alpha=0.85, label=label)
    for budget in budgets:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget epsilon = {budget:g}")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title}: privacy spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    """Write a figure atomically (temp file, then rename)."""
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    fig.clf()
    _pyplot().close(fig)
    tmp.replace(out)
    return out


def write_loss_plot(run_dir: Path) -> Path | None:
    """``loss.png``: train and held-out loss per round (people read curves faster than tables)."""
    rows = summary_rows(read_jsonl_records(run_dir / "metrics.jsonl"))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train (clients, weighted)"), ("heldout_loss", "held-out (global adapter)"),
                       ("federated_eval_loss", "federated eval")):
        points = [(r["round"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("answer-token loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, run_dir / "loss.png")


def print_run_report(run_dir: Path) -> None:
    """The end of a run, for ``finlora simulate`` and ``finlora server`` alike: the summary table, the privacy
    and benchmark tables, and the plots (nothing when the run wrote no ``metrics.jsonl``)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return
    print_summary(run_dir)
    print_privacy(run_dir)
    print_eval(run_dir)
    for plot in (write_loss_plot(run_dir), write_privacy_plot(run_dir)):
        if plot:
            print(f"plot: {plot}")
