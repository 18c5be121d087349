"""Per-round wall time split into load / train / serialize / aggregate, tiny model, 4 institutions.

Runs one real simulation (Flower + Ray, as ``finlora simulate`` does) and reads what the clients and the
server recorded in ``metrics.jsonl``. The point it shows: the base model is loaded once per process (round 1
pays for it) and never again; later rounds only swap adapter weights. Round 1 is the baseline the later
rounds are compared with. Printed, not asserted.

    python bench/round_breakdown.py [--clients 4] [--rounds 3] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


from finlora.common.io import read_jsonl_records
from finlora.simulation.keys import provision_simulation_keys
from finlora.simulation.launcher import run_simulation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="where to keep the run (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="finlora-bench-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = provision_simulation_keys(out / "round-breakdown" / "keys", args.clients)  # zk is on by default
    with open(out / "flower.log", "w") as flower_log:
        result = run_simulation(args.clients, {"num-rounds": args.rounds, "run-id": "round-breakdown",
                                               "out-dir": str(out), "strategy.min-available-nodes": args.clients,
                                               "zk.keys-dir": str(keys)},
                                log_to=flower_log)
    if not result.ok:
        print(f"simulation failed: {result.status}; see {out / 'flower.log'}", file=sys.stderr)
        return 1
    rows = []
    for rec in read_jsonl_records(out / "round-breakdown" / "metrics.jsonl"):
        if rec["round"] == 0:
            continue
        clients = list(rec["clients"].values())
        row = {
            "round": rec["round"],
            "wall_s": rec["seconds"],
            "load_s": max(c["load_seconds"] for c in clients),
            "train_s": statistics.mean(c["train_seconds"] for c in clients),
            "serialize_s": statistics.mean(c["serialize_seconds"] for c in clients),
            "aggregate_s": rec["aggregate_seconds"],
            "loads_in_round": sum(1 for c in clients if c["load_seconds"] > 0),
            "max_loads_per_process": max(c["base_model_loads"] for c in clients),
        }
        row["other_s"] = row["wall_s"] - row["load_s"] - row["train_s"] - row["serialize_s"] - row["aggregate_s"]
        rows.append(row)
    print(f"\n{args.clients} institutions x {args.rounds} rounds, tiny model, CPU\n")
    head = f"{'round':>5} {'wall s':>7} {'load s':>7} {'train s':>8} {'serial. s':>9} {'aggr. s':>8} " \
           f"{'other s':>8} {'loads':>6} {'loads/process':>13}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['round']:>5} {r['wall_s']:>7.2f} {r['load_s']:>7.2f} {r['train_s']:>8.3f} {r['serialize_s']:>9.4f} "
              f"{r['aggregate_s']:>8.4f} {r['other_s']:>8.2f} {r['loads_in_round']:>6} "
              f"{r['max_loads_per_process']:>13}")
    if len(rows) > 1:
        later = statistics.mean(r["wall_s"] for r in rows[1:])
        print(f"\nround 1 (cold: imports + base model load) / later rounds (warm): {rows[0]['wall_s'] / later:.2f}x")
        print(f"base model loads after round 1: {sum(r['loads_in_round'] for r in rows[1:])} "
              f"(a load per round would be {args.clients * (len(rows) - 1)})")
    (out / "round_breakdown.json").write_text(json.dumps(rows, indent=2))
    print(f"\nJSON: {out / 'round_breakdown.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
