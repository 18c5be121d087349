"""What the resident trainer saves per round in a real deployment: ``finlora server`` + N ``finlora client``.

Flower 1.42 starts a fresh ClientApp process for every message, so without the resident trainer every train and
evaluate message re-imports torch and reloads the base model. This runs the same federation twice on loopback
(``--insecure``, tiny model, DP on as by default, zk off so that no signing keys are needed, no server-side
held-out loss or benchmark eval so that the round time is the clients' work and the messaging): once with
``finlora client --no-resident`` and once with the resident trainer, and compares, from each run's
``metrics.jsonl``, per round: wall seconds, the slowest client's training seconds, the overhead (wall - train),
base-model loads in the round, and the distinct client process ids. Printed and written, not asserted.

    python bench/resident_trainer.py [--clients 2] [--rounds 3] [--evaluate on|off|both] [--out bench/out/resident]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

from finlora.common.flower_processes import free_port
from finlora.common.io import atomic_write_text, read_jsonl_records
from finlora.common.sample_data import sentiment_rows

MODES = ("no-resident", "resident")


def cli(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", *args], cwd=REPO, env=dict(os.environ),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def run_federation(root: Path, data: list[Path], rounds: int, resident: bool, evaluate: bool,
                   timeout: float) -> dict[str, Any]:
    """One ``finlora server`` and ``len(data)`` clients; the run's metrics records and its wall time."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"num-rounds": rounds, "strategy.min-available-nodes": len(data),
                "strategy.fraction-evaluate": 1.0 if evaluate else 0.0, "strategy.round-timeout": 900.0,
                "zk.enabled": False, "eval.heldout": False, "eval.every": 0}
    (root / "run.toml").write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in settings.items()))
    port = free_port()
    start = time.monotonic()
    server = cli("server", "--state", str(root / "server"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                 "--config", str(root / "run.toml"), "--run-id", "bench", log=root / "server.log")
    clients: list[subprocess.Popen] = []
    try:
        while "waiting for institutions" not in (root / "server.log").read_text():
            if server.poll() is not None or time.monotonic() - start > 120:
                raise RuntimeError(f"finlora server did not start; see {root / 'server.log'}")
            time.sleep(0.3)
        for i, path in enumerate(data):
            clients.append(cli("client", "--insecure", "--superlink", f"127.0.0.1:{port}", "--data", str(path),
                               "--name", f"bank-{i}", "--state", str(root / f"bank-{i}"),
                               "--dp-ledger-dir", str(root / "dp-state"),  # a fresh ledger per run (never reset)
                               *([] if resident else ["--no-resident"]), log=root / f"bank-{i}.log"))
        code = server.wait(timeout=timeout)
        wall = time.monotonic() - start
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # finlora client stops its SuperNode and trainer on SIGTERM
        for proc in (server, *clients):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if code != 0:
        raise RuntimeError(f"finlora server exited with {code}; see {root / 'server.log'}")
    return {"wall_seconds": wall, "load_average_1m": os.getloadavg()[0],  # other jobs on the machine skew timings
            "metrics": read_jsonl_records(root / "server" / "runs" / "bench" / "metrics.jsonl")}


def round_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in metrics:
        if rec["round"] == 0:
            continue
        clients = list(rec["clients"].values())
        train = max((c["train_seconds"] for c in clients), default=0.0)
        rows.append({"round": rec["round"], "wall_s": rec["seconds"], "max_train_s": train,
                     "overhead_s": rec["seconds"] - train,
                     "base_model_loads": sum(1 for c in clients if c.get("load_seconds", 0) > 0),
                     "max_load_s": max((c.get("load_seconds", 0.0) for c in clients), default=0.0),
                     "process_ids": sorted({int(c["process_id"]) for c in clients if "process_id" in c}),
                     "clients": len(clients), "errors": rec.get("errors", {})})
    return rows


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (f"{'mode':<12} {'round':>5} {'wall s':>8} {'max train s':>11} {'overhead s':>10} {'loads':>5} "
            f"{'load s':>7} {'process ids':<24}")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        seen: set[int] = set()
        for row in res["rounds"]:
            seen.update(row["process_ids"])
            lines.append(f"{name:<12} {row['round']:>5} {row['wall_s']:>8.2f} {row['max_train_s']:>11.2f} "
                         f"{row['overhead_s']:>10.2f} {row['base_model_loads']:>5} {row['max_load_s']:>7.2f} "
                         f"{','.join(map(str, row['process_ids'])):<24}")
        lines.append(f"{name:<12} {'all':>5} {res['total_round_s']:>8.2f} {res['total_train_s']:>11.2f} "
                     f"{res['total_overhead_s']:>10.2f} {res['total_loads']:>5} {'':>7} {len(seen)} distinct "
                     f"(run wall {res['wall_seconds']:.1f} s, load average {res['load_average_1m']:.1f})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="sample rows split across the institutions")
    parser.add_argument("--evaluate", choices=["on", "off", "both"], default="on",
                        help="federated evaluation messages (each also pays the reload without the trainer)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per federation run")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "resident"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINLORA_HOME", str(out / "finlora-home"))
    all_rows = out / "data" / "all.jsonl"
    atomic_write_text(all_rows, "".join(json.dumps(r) + "\n" for r in sentiment_rows(n=args.rows, seed=5)))
    split = subprocess.run([sys.executable, "-m", "finlora.simulation.cli", "data", "split", "--data", str(all_rows),
                            "--clients", str(args.clients), "--out", str(out / "data")], cwd=REPO,
                           capture_output=True, text=True, check=False)
    if split.returncode != 0:
        print(split.stdout, split.stderr, file=sys.stderr)
        return 1
    data = [out / "data" / f"bank-{i}.jsonl" for i in range(args.clients)]
    evaluations = {"on": [True], "off": [False], "both": [True, False]}[args.evaluate]
    summary: dict[str, Any] = {"clients": args.clients, "rounds": args.rounds, "model": "tiny", "dp": "on (sample)",
                               "zk": "off", "machine": f"{os.cpu_count()} CPU cores, no GPU", "runs": {}}
    for evaluate in evaluations:
        results: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            tag = f"{mode}{'' if evaluate else '-noeval'}"
            print(f"running {tag}: {args.clients} institutions x {args.rounds} rounds ...", flush=True)
            res = run_federation(out / tag, data, args.rounds, mode == "resident", evaluate, args.timeout)
            rows = round_rows(res["metrics"])
            results[mode] = {"wall_seconds": res["wall_seconds"], "load_average_1m": res["load_average_1m"],
                             "rounds": rows,
                             "total_round_s": sum(r["wall_s"] for r in rows),
                             "total_train_s": sum(r["max_train_s"] for r in rows),
                             "total_overhead_s": sum(r["overhead_s"] for r in rows),
                             "total_loads": sum(r["base_model_loads"] for r in rows),
                             "distinct_process_ids": len({p for r in rows for p in r["process_ids"]})}
        ratio = results["no-resident"]["total_overhead_s"] / max(results["resident"]["total_overhead_s"], 1e-9)
        title = (f"{args.clients} institutions x {args.rounds} rounds, tiny model, DP on, zk off, federated evaluate "
                 f"{'on' if evaluate else 'off'}")
        text = f"{title}\n\n{table(results)}\n\noverhead no-resident / resident: {ratio:.1f}x"
        print(f"\n{text}\n", flush=True)
        key = "evaluate-on" if evaluate else "evaluate-off"
        summary["runs"][key] = {"results": results, "overhead_ratio": ratio, "table": text}
        atomic_write_text(out / f"table-{key}.txt", text + "\n")
    atomic_write_text(out / "resident_trainer.json", json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'resident_trainer.json'} and {out}/table-*.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
