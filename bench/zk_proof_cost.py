"""Cost of the zero-knowledge range + L2-norm proof (zk/normproof.py) per update size, on one core.

For each size a fresh process quantizes a random update to int16 under the default bound, commits it (the
baseline: what every zk round already pays) and proves; a second fresh process verifies, as the server or an
auditor does. It reports seconds per prover stage, the verifier's seconds (its first verification, and the median
of three more), proof bytes and the prover's peak memory. Ratios compare against the commit in the same
run, against the targets at Llama-3.1-8B size (4,718,592 values: prove <= 120 s, verify <= 2 s, proof <= 64 kB,
memory <= 4 GiB), and against RoFL's own L2-proof benchmark (32,768 params, 32-bit: prove 36.6 s, verify 10.2 s)
scaled linearly to the same size. Printed and written as JSON; nothing is asserted.

    python bench/zk_proof_cost.py [--sizes 65536,262144,1048576,4718592] [--out bench/zk_proof_cost.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from finlora.zk.commit import commit_rows
from finlora.zk.encoding import quantize_update
from finlora.zk.generators import generators, wide_generators
from finlora.zk.normproof import Shape, Statement, bound_sq, prove, verify

LLAMA_8B_R8_QKV = 4_718_592
ROFL_L2 = {"params": 32_768, "prove_s": 36.6, "verify_s": 10.2}
TARGET = {"prove_s": 120.0, "verify_s": 2.0, "proof_bytes": 64_000, "peak_gib": 4.0}
NORM_BOUND, FRAC_BITS, BITS = 8.0, 12, 16


def measure(size: int) -> dict:
    """One size, in this process (the parent runs each size in its own process for a clean peak-memory figure)."""
    rng = np.random.default_rng(size)
    delta = {"lora": rng.normal(0.0, 1.0, size)}
    values, _ = quantize_update(delta, NORM_BOUND, FRAC_BITS, BITS, rng)
    st = Statement("bench-run#00", 1, b"\x01" * 32, size, BITS, bound_sq(NORM_BOUND, FRAC_BITS))
    generators()  # derived once per process: not part of any measured step
    start = time.perf_counter()
    wide_generators(Shape.of(st).width)  # digit-row generators: once per process (from the disk cache when wide)
    generators_s = time.perf_counter() - start
    start = time.perf_counter()
    commitments, blindings = commit_rows(values)
    commit_s = time.perf_counter() - start
    stages: list[tuple[str, float]] = []
    start = time.perf_counter()
    proof = prove(st, values, blindings, commitments,
                  progress=lambda msg: stages.append((msg, time.perf_counter() - start)))
    prove_s = time.perf_counter() - start
    verify_s, verify_warm_s = _verify_elsewhere(st, commitments, proof)
    digit_rows_s = next(t for msg, t in stages if msg.startswith("committed"))
    sumcheck_end = max(t for msg, t in stages if msg.startswith("sumcheck"))
    dots_end = next(t for msg, t in stages if msg.startswith("dot-product"))
    shape = Shape.of(st)
    return {"values": size, "digit_rows": shape.digit_rows_sent, "digit_row_width": shape.width,
            "generators_s": generators_s, "commit_s": commit_s, "prove_s": prove_s, "digit_rows_s": digit_rows_s,
            "sumcheck_s": sumcheck_end - digit_rows_s, "dot_products_s": dots_end - sumcheck_end,
            "rest_s": prove_s - dots_end, "verify_s": verify_s, "verify_warm_s": verify_warm_s,
            "proof_bytes": len(proof),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _verify_elsewhere(st: Statement, commitments: list[bytes], proof: bytes) -> tuple[float, float]:
    """Verify in a fresh process, as the server or an auditor does (they never ran the prover, whose 2 GiB of
    freed tables would otherwise share the heap): the first verification, then the median of three more."""
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        pickle.dump((st, commitments, proof), f)
        f.flush()
        child = subprocess.run([sys.executable, __file__, "--verify-only", f.name], capture_output=True, text=True,
                               check=True)
    times = json.loads(child.stdout.strip().splitlines()[-1])
    return times[0], sorted(times[1:])[1]


def verify_only(path: str) -> None:
    with open(path, "rb") as f:
        st, commitments, proof = pickle.load(f)
    generators()
    wide_generators(Shape.of(st).width)  # loaded once per process, as the server does
    times = []
    for _ in range(4):
        start = time.perf_counter()
        verify(st, commitments, proof)
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=f"65536,262144,1048576,{LLAMA_8B_R8_QKV}")
    parser.add_argument("--out", default=str(Path(__file__).with_name("zk_proof_cost.json")))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: measure one size, print JSON
    parser.add_argument("--verify-only", help=argparse.SUPPRESS)  # child mode: time verify of a pickled proof
    args = parser.parse_args()
    if args.verify_only:
        verify_only(args.verify_only)
        return
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"proving {size:,} values ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True,
                               check=False)
        if child.returncode != 0:
            print(f"  failed: {child.stderr[-2000:]}")
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        scale = size / ROFL_L2["params"]
        row["rofl_prove_s"], row["rofl_verify_s"] = ROFL_L2["prove_s"] * scale, ROFL_L2["verify_s"] * scale
        rows.append(row)
        print(f"  prove {row['prove_s']:.1f} s (digit rows {row['digit_rows_s']:.1f}, "
              f"sumcheck {row['sumcheck_s']:.1f}, "
              f"dot products {row['dot_products_s']:.1f}), verify {row['verify_s']:.2f} s "
              f"(then {row['verify_warm_s']:.2f} s), "
              f"{row['proof_bytes']:,} bytes, peak {row['peak_gib']:.2f} GiB", flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "targets_at_4718592": TARGET, "rofl_anchor": ROFL_L2},
                                         indent=2) + "\n")
    print(f"\n{'values':>10} {'setup s':>8} {'commit s':>9} {'prove s':>8} {'prove/commit':>12} {'verify s':>9} "
          f"{'proof kB':>9} {'peak GiB':>9} {'RoFL prove s':>13} {'RoFL/ours':>10}")
    for r in rows:
        print(f"{r['values']:>10,} {r['generators_s']:>8.1f} {r['commit_s']:>9.1f} {r['prove_s']:>8.1f} "
              f"{r['prove_s'] / r['commit_s']:>12.1f} "
              f"{r['verify_s']:>9.2f} {r['proof_bytes'] / 1000:>9.1f} {r['peak_gib']:>9.2f} "
              f"{r['rofl_prove_s']:>13,.0f} {r['rofl_prove_s'] / r['prove_s']:>10.1f}x")
    full = next((r for r in rows if r["values"] == LLAMA_8B_R8_QKV), None)
    if full:
        print("\nat 4,718,592 values, measured / target: "
              + ", ".join(f"{k.replace('_', ' ')} {full[k] / v:.2f}" for k, v in TARGET.items()))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
