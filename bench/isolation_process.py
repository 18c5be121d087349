"""Does Flower 1.42's ``--isolation process`` keep a ClientApp process (and its loaded model) across messages?

The question issue 6 asks before building the resident trainer. Runs ``finlora server --insecure`` and one
institution as ``flower-supernode --isolation process`` plus the ``flower-superexec`` that then launches its
ClientApps (what Flower documents for that mode; the finlora ClientApp runs in-process, no resident trainer),
for a few rounds on the tiny model, and reads what each train reply reported: its process id and how many
times that process had loaded the base model. Printed and written as JSON; not asserted.

    python bench/isolation_process.py [--rounds 3] [--out bench/out/isolation]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


from finlora.common.flower_processes import flower_bin, flower_env, free_port, stop_process_tree, toml_value
from finlora.common.io import atomic_write_text, read_jsonl_records
from finlora.common.sample_data import sentiment_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/out/isolation")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "bank-0.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n=80, seed=3)))
    (out / "run.toml").write_text(
        f'num-rounds = {args.rounds}\n"strategy.min-available-nodes" = 1\n"strategy.min-train-nodes" = 1\n'
        '"strategy.min-evaluate-nodes" = 1\n"strategy.fraction-evaluate" = 0.0\n"zk.enabled" = false\n'
        '"dp.enabled" = false\n"eval.every" = 0\n"eval.heldout" = false\n"train.local-steps" = 4\n')
    port, runtime_port = free_port(), free_port()
    state = out / "state"
    server = subprocess.Popen([sys.executable, "-m", "finlora.simulation.cli", "server", "--state", str(state),
                               "--insecure", "--host", "127.0.0.1", "--port", str(port),
                               "--config", str(out / "run.toml"), "--run-id", "isolation"],
                              cwd=Path(__file__).resolve().parent.parent,
                              stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    node_env = flower_env(out / "node-home", free_port())
    node_config = {"data-path": str(data), "institution": "bank-0"}
    procs = [server]
    try:
        deadline = time.monotonic() + 120
        while "waiting for institutions" not in (out / "server.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                print((out / "server.log").read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        procs.append(subprocess.Popen(
            [flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--isolation",
             "process", "--port", str(runtime_port), "--node-config",
             " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())],
            cwd=out, env=node_env, stdout=open(out / "supernode.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        procs.append(subprocess.Popen(
            [flower_bin("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"],
            cwd=out, env=node_env, stdout=open(out / "superexec.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        code = server.wait(timeout=900)
    finally:
        for proc in reversed(procs):
            stop_process_tree(proc)
    if code != 0:
        print(f"the federation failed (exit {code}); see {out}/*.log", file=sys.stderr)
        return 1
    rows = []
    for rec in read_jsonl_records(state / "runs" / "isolation" / "metrics.jsonl"):
        for client in rec["clients"].values():
            rows.append({"round": rec["round"], "process_id": client["process_id"],
                         "base_model_loads_in_process": client["base_model_loads"],
                         "load_seconds": client["load_seconds"], "train_seconds": client["train_seconds"],
                         "round_seconds": rec["seconds"]})
    lines = ["flower-supernode --isolation process + flower-superexec, tiny model, 1 institution", "",
             f"{'round':>5} {'process id':>10} {'loads in that process':>21} {'load s':>7} {'train s':>8} "
             f"{'round s':>8}"]
    lines += [f"{r['round']:>5} {r['process_id']:>10} {r['base_model_loads_in_process']:>21} "
              f"{r['load_seconds']:>7.2f} {r['train_seconds']:>8.2f} {r['round_seconds']:>8.1f}" for r in rows]
    distinct = len({r["process_id"] for r in rows})
    lines.append(f"\n{len(rows)} train messages, {distinct} distinct ClientApp processes: state "
                 f"{'does not persist' if distinct == len(rows) else 'persists'} across messages")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "isolation.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "isolation.md", table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
