"""Cost of secure aggregation (zk/secagg.py) per institution and for the server, at Llama-3.1-8B size.

For 4, 8 and 16 institutions holding random int16 updates of 4,718,592 values (r8 on q/k/v), it runs every stage
of one round in this process, one institution after the other (so each institution's seconds are its own, on one
core): key advertisement, dealing shares, masking; then the server's unmasking with everyone present and with one
institution gone before its masked input (the server then rebuilds its key and removes its pairwise masks). The
baseline in the same run is what the server does today without secure aggregation: sum the plaintext int16
updates. Bytes compare one institution's upload (masked vector + share bundle) with its unmasked int16 update.
With ``--check`` the 4-institution round also commits to every update and checks the unmasked sum against the
weighted row commitments (the audit equation). Targets (issue 16, 4 institutions): masking + shares <= 10 s,
bytes <= 1.5x, server unmasking <= 5 s. Printed as a table and written as JSON; nothing is asserted.

    python bench/secagg_cost.py [--size 4718592] [--institutions 4,8,16] [--check] [--out bench/secagg_cost.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from finlora.zk import signing
from finlora.zk.commit import GROUP_ORDER, SCALAR_BYTES, commit_rows, commitments_digest, num_rows
from finlora.zk.secagg import Packing, RoundContext, SecAggClient, SecAggServer, aggregate_opens, round_weights

LLAMA_8B_R8_QKV = 4_718_592
TARGET = {"client_s": 10.0, "bytes_ratio": 1.5, "server_s": 5.0}


def _bundle_bytes(bundle) -> int:
    return sum(len(c) for c in bundle.ciphertexts.values()) + sum(
        len(p) for cs in bundle.commitments.values() for p in cs) + len(bundle.signature)


def one_round(size: int, n: int, drop: str | None, check: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"bank-{i:02d}" for i in range(n)]
    keys = {name: signing.generate_key() for name in names}
    values = {name: rng.integers(-(1 << 15) + 1, 1 << 15, size).astype(np.int64) for name in names}
    rows = num_rows(size)
    if check:
        committed = {name: commit_rows(values[name]) for name in names}
    else:  # masking cost does not depend on the blindings' values; the digest is only signed
        committed = {name: ([bytes(48)] * rows, [int(rng.integers(1 << 62)) for _ in range(rows)]) for name in names}
    ctx = RoundContext("bench", 1)
    identities = {name: k.public_key() for name, k in keys.items()}
    server = SecAggServer(ctx, identities)
    clients = {name: SecAggClient(name, keys[name], ctx, 128) for name in names}
    client_s = dict.fromkeys(names, 0.0)

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        client_s[name] += time.perf_counter() - start
        return out

    ads = server.collect_advertisements([timed(nm, clients[nm].advertise) for nm in names])
    bundles = [timed(nm, clients[nm].share_keys, ads, server.threshold, identities) for nm in names]
    routed = server.route_shares(bundles)
    for name, inbox in routed.items():
        timed(name, clients[name].receive_shares, inbox)
    weights = round_weights(ads)
    packing = Packing.for_round(size, rows, 16, sum(weights.values()))
    inputs = []
    for name in names:
        if name == drop:
            continue
        blind = [weights[name] * r % GROUP_ORDER for r in committed[name][1]]
        inputs.append(timed(name, clients[name].masked_input, weights[name] * values[name], blind, packing,
                            commitments_digest(committed[name][0])))
    start = time.perf_counter()
    survivors = server.collect_masked(inputs, packing)
    sigs = {nm: clients[nm].sign_survivors(survivors) for nm in survivors}
    responses = [clients[nm].unmask(survivors, sigs, identities) for nm in survivors]
    aggregate, blindings = server.unmask(survivors, responses, packing)
    server_s = time.perf_counter() - start
    expected = sum(weights[nm] * values[nm] for nm in survivors)
    start = time.perf_counter()
    plain = np.zeros(size, dtype=np.int64)
    for nm in survivors:
        plain += values[nm].astype(np.int16).astype(np.int64)
    baseline_s = time.perf_counter() - start
    row = {"institutions": n, "size": size, "dropped": drop or "", "threshold": server.threshold,
           "slot_bits": packing.slot_bits, "values_per_element": packing.slots,
           "client_s_mean": float(np.mean([client_s[nm] for nm in names if nm != drop])),
           "client_s_max": float(max(client_s[nm] for nm in names if nm != drop)),
           "masked_bytes": packing.elements * SCALAR_BYTES, "share_bytes": _bundle_bytes(bundles[0]),
           "int16_bytes": 2 * size, "server_unmask_s": server_s, "plaintext_sum_s": baseline_s,
           "exact": bool(np.array_equal(aggregate, expected))}
    row["bytes_ratio"] = (row["masked_bytes"] + row["share_bytes"]) / row["int16_bytes"]
    if check:
        start = time.perf_counter()
        row["opens_commitments"] = aggregate_opens(aggregate, blindings,
                                                   {nm: committed[nm][0] for nm in survivors}, weights)
        row["check_s"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=LLAMA_8B_R8_QKV)
    parser.add_argument("--institutions", default="4,8,16")
    parser.add_argument("--check", action="store_true", help="commit and check the sum against the commitments")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("secagg_cost.json"))
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.institutions.split(",")):
        for drop in (None, "bank-01"):
            print(f"secagg: {n} institutions{', one drops before masking' if drop else ''} ...", flush=True)
            rows.append(one_round(args.size, n, drop, args.check and n == 4 and drop is None))
    print("\n| institutions | dropped | client s (mean/max) | bytes vs int16 | server unmask s | plaintext sum s"
          " | exact |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['institutions']} | {r['dropped'] or '-'} | {r['client_s_mean']:.2f} / {r['client_s_max']:.2f}"
              f" | {r['bytes_ratio']:.2f}x | {r['server_unmask_s']:.2f} | {r['plaintext_sum_s']:.3f} | {r['exact']} |")
    four = [r for r in rows if r["institutions"] == 4 and not r["dropped"]]
    if four and args.size == LLAMA_8B_R8_QKV:
        r = four[0]
        print(f"\nagainst the targets at 4 institutions: masking + shares {r['client_s_max'] / TARGET['client_s']:.2f}x"
              f" of 10 s, bytes {r['bytes_ratio'] / TARGET['bytes_ratio']:.2f}x of 1.5x, server unmasking "
              f"{r['server_unmask_s'] / TARGET['server_s']:.2f}x of 5 s")
        if "check_s" in r:
            print(f"sum opens the weighted commitments: {r['opens_commitments']} ({r['check_s']:.2f} s)")
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
