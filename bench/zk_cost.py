"""Cost of the commitment layer per update size: client commit, server verification, audit, bytes on the wire.

For each size, ``--clients`` synthetic institutions quantize a random update (int8 by default), commit and
sign it; the server verifies them all in one batched check, aggregates, applies the aggregate to a global
adapter and records the round; then the audit re-checks that round from the ledger alone. Printed, not
asserted. Targets at 4.72 M values (Llama-3.1-8B, LoRA r8 on q/k/v) on one core: commit <= 10 s,
verify <= 1 s per client, <= 100 kB added per client per round.

    python bench/zk_cost.py [--sizes 65536,1048576,4718592] [--clients 3] [--bits 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from finlora.zk.audit import audit_run
from finlora.zk.encoding import apply_aggregate, quantize_update
from finlora.zk.generators import generators
from finlora.zk.ledger import adapter_relpath, append_entry, file_sha256, header_entry, record_round
from finlora.zk.signing import generate_key
from finlora.zk.verify import aggregate, make_submission, verify_round

LLAMA_8B_R8_QKV = 4_718_592
RUN_ID = "bench"


def _save(run_dir: Path, round_num: int, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path = run_dir / adapter_relpath(round_num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def measure(size: int, clients: int, bits: int, frac_bits: int, norm_bound: float, run_dir: Path) -> dict:
    """One round of ``clients`` updates of ``size`` values through commit, verify, record and audit."""
    rng = np.random.default_rng(size)
    keys = {f"inst-{i}": generate_key() for i in range(clients)}
    global0 = {"lora_B": np.zeros(size, np.float32)}
    append_entry(run_dir, header_entry(RUN_ID, {n: k.public_key() for n, k in keys.items()},
                                       file_sha256(_save(run_dir, 0, global0)), norm_bound, frac_bits, bits))
    subs, commit_s = [], []
    for node, key in keys.items():
        # ~ a third of the int range per value on average, the norm bound not binding
        delta = {"lora_B": rng.normal(0, 40 / 2 ** frac_bits, size)}
        values, layout = quantize_update(delta, norm_bound, frac_bits, bits, rng)
        start = time.perf_counter()
        subs.append(make_submission(values, 100, key, RUN_ID, 1, node))
        commit_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    accepted, rejected = verify_round(subs, RUN_ID, 1, {n: k.public_key() for n, k in keys.items()}, norm_bound,
                                      frac_bits, bits, expected_size=size)
    verify_s = time.perf_counter() - start
    assert len(accepted) == clients, rejected
    start = time.perf_counter()
    total, blindings, weight = aggregate(accepted)
    aggregate_s = time.perf_counter() - start
    _save(run_dir, 1, apply_aggregate(global0, total, layout, weight, frac_bits))
    record_round(run_dir, 1, layout, accepted, rejected, total, blindings, weight)
    start = time.perf_counter()
    verdicts = audit_run(run_dir)
    audit_s = time.perf_counter() - start
    assert all(v.ok for v in verdicts), verdicts
    wire = subs[0].to_wire(bits)
    added = len(wire["commitments"]) + len(wire["blindings"]) + len(wire["signature"]) + 8
    return {"size": size, "rows": len(subs[0].commitments), "commit_s": float(np.median(commit_s)),
            "verify_s": verify_s / clients, "verify_round_s": verify_s, "aggregate_s": aggregate_s,
            "audit_s": audit_s, "commit_bytes": len(wire["commitments"]), "added_bytes": added,
            "values_bytes": wire["values"].nbytes, "float32_bytes": 4 * size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=f"{2 ** 16},{2 ** 20},{LLAMA_8B_R8_QKV}",
                        help="comma-separated update sizes (numbers of LoRA values)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8, choices=(8, 16))
    parser.add_argument("--frac-bits", type=int, default=12)
    parser.add_argument("--norm-bound", type=float, default=1e6)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    start = time.perf_counter()
    generators()
    print(f"generators: {time.perf_counter() - start:.2f} s once per process; clients per round: {args.clients}; "
          f"int{args.bits}, scale 2^{args.frac_bits}")
    head = (f"{'values':>9} {'rows':>5} {'commit s':>9} {'verify s/client':>15} {'verify round s':>14} "
            f"{'aggregate s':>11} {'audit s':>8} {'commitments B':>13} {'added B/client':>14} {'values B':>9} "
            f"{'(float32 B)':>11}")
    print(head)
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            m = measure(size, args.clients, args.bits, args.frac_bits, args.norm_bound, Path(tmp) / RUN_ID)
        print(f"{m['size']:>9} {m['rows']:>5} {m['commit_s']:>9.2f} {m['verify_s']:>15.3f} "
              f"{m['verify_round_s']:>14.2f} {m['aggregate_s']:>11.3f} {m['audit_s']:>8.2f} {m['commit_bytes']:>13} "
              f"{m['added_bytes']:>14} {m['values_bytes']:>9} {m['float32_bytes']:>11}", flush=True)
    print("added B/client = row commitments (48 B/row) + blindings (32 B/row) + signature (64 B) + count (8 B); "
          "the values travel as int8/int16 instead of float32.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
