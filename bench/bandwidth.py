"""Bytes per institution per round, and what each wire precision costs in held-out loss (tiny model).

Runs the same federation (same data, seeds and partitions; DP off so no noise masks the difference) once per
``transport.dtype`` (float32 is the baseline), plus the zk default (committed int16 updates) for reference,
and reads ``metrics.jsonl``: bytes sent per client per round (arrays plus any transport / zk record, as
Flower counts them) and the held-out loss after the last round. Printed and written as JSON; not asserted.

    python bench/bandwidth.py [--clients 3] [--rounds 3] [--out bench/out/bandwidth]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


from finlora.common.io import atomic_write_text, read_jsonl_records
from finlora.simulation.keys import provision_simulation_keys
from finlora.simulation.launcher import run_simulation

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1, "zk int16 (default)": 2}
VARIANTS = {
    "float32": {"transport.dtype": "float32", "zk.enabled": False},
    "float16": {"transport.dtype": "float16", "zk.enabled": False},
    "int8": {"transport.dtype": "int8", "zk.enabled": False},
    "zk int16 (default)": {"transport.dtype": "float32", "zk.enabled": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/out/bandwidth")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from finlora.common.config import load_config
    from finlora.common.model import lora_shapes

    cfg = load_config()
    values = sum(int(np.prod(shape)) for shape in lora_shapes(cfg.model, cfg.lora).values())
    rows = []
    for name, overrides in VARIANTS.items():
        run_id = name.split()[0]
        config = {"num-rounds": args.rounds, "run-id": run_id, "out-dir": str(out), "dp.enabled": False,
                  "eval.every": 0, "strategy.min-available-nodes": args.clients, **overrides}
        if overrides["zk.enabled"]:  # the simulated institutions' signing keys, as `finlora simulate` makes them
            config["zk.keys-dir"] = str(provision_simulation_keys(out / run_id / "keys", args.clients))
        with open(out / f"{run_id}.log", "w") as flower_log:
            result = run_simulation(args.clients, config, log_to=flower_log)
        if not result.ok:
            print(f"{name}: simulation failed ({result.status}); see {out / f'{run_id}.log'}", file=sys.stderr)
            return 1
        metrics = read_jsonl_records(out / run_id / "metrics.jsonl")
        trained = [m for m in metrics if m["round"] > 0]
        rows.append({"transport": name, "bytes_per_client_round": trained[-1]["bytes_sent_per_client"],
                     "tensor_bytes": values * BYTES_PER_VALUE[name],
                     "heldout_loss": trained[-1]["heldout_loss"], "heldout_loss_round0": metrics[0]["heldout_loss"],
                     "max_update_norm": max(c.get("update_norm", 0.0) for m in trained for c in m["clients"].values())})
    base = rows[0]
    lines = [f"{args.clients} institutions x {args.rounds} rounds, tiny model ({values:,} LoRA values), DP off, CPU",
             "bytes/client/round: all Flower records of the reply (the tiny model's long tensor names weigh a lot);",
             "tensor bytes: the values alone, which is what scales to an 8B model", "",
             f"{'transport':<20} {'bytes/client/round':>18} {'tensor bytes':>12} {'vs float32':>10} "
             f"{'held-out loss':>13} {'Δ loss vs float32':>17}"]
    for row in rows:
        row["bytes_ratio"] = row["bytes_per_client_round"] / base["bytes_per_client_round"]
        row["loss_delta"] = row["heldout_loss"] - base["heldout_loss"]
        lines.append(f"{row['transport']:<20} {row['bytes_per_client_round']:>18,.0f} {row['tensor_bytes']:>12,} "
                     f"{row['bytes_ratio']:>9.3f}x "
                     f"{row['heldout_loss']:>13.4f} {row['loss_delta']:>+17.4f}")
    lines.append(f"\nheld-out loss before training: {base['heldout_loss_round0']:.4f}")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(out / "bandwidth.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "bandwidth.md", table + "\n")
    print(f"\nwritten: {out / 'bandwidth.json'}, {out / 'bandwidth.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
