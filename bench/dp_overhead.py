"""Tokens/s and peak memory of local training with DP-SGD (Opacus) vs without, same model, data and batch size.

Both loops run in this process on the same examples, alternating, after one warm-up round each; peak memory
is CUDA's allocator peak (on CPU it is not measured and printed as n/a). Printed, not asserted.
Target on a GPU: DP costs <= 10 % throughput.

    python bench/dp_overhead.py [--model tiny] [--batch-size 8] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys


from finlora.client.dp_train import dp_train_round, sample_rate
from finlora.client.privacy import PrivacyLedger
from finlora.client.train import train_round
from finlora.common.adapter import initial_adapter, load_lora_state, lora_state, shapes_of
from finlora.common.config import load_config
from finlora.common.data import encode_rows
from finlora.common.sample_data import sentiment_rows
from finlora.common.model import get_model_bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--quantization", default="4")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    cfg = load_config({"model.name": args.model, "model.quantization": args.quantization, "dp.enabled": True,
                       "train.batch-size": args.batch_size, "train.local-steps": args.steps})
    bundle = get_model_bundle(cfg.model, cfg.lora)
    pad = bundle.tokenizer.pad_token_id
    examples = encode_rows(sentiment_rows(n=512), bundle.tokenizer, cfg.data.max_length)
    init = initial_adapter(shapes_of(lora_state(bundle.model)), cfg.lora.seed)
    cuda = torch.cuda.is_available()

    def plain(seed: int):
        return train_round(bundle.model, examples, cfg.train, cfg.train.lr, pad, seed=seed)

    def private(seed: int):
        ledger = PrivacyLedger(target_epsilon=1e9, delta=1e-5, accountant="rdp", noise_multiplier=1.0)
        return dp_train_round(bundle.model, examples, cfg.train, cfg.dp, ledger, cfg.train.lr, pad, seed=seed)

    results: dict[str, list[tuple[float, float]]] = {"plain": [], "dp": []}
    for repeat in range(args.repeats + 1):
        for name, fn in (("plain", plain), ("dp", private)):
            load_lora_state(bundle.model, init)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            stats = fn(repeat)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            if repeat > 0:  # repeat 0 warms up kernels and caches
                results[name].append((stats.tokens / stats.seconds, peak))
    device = torch.cuda.get_device_name() if cuda else "CPU"
    rate = sample_rate(len(examples), cfg.train)
    print(f"\n{args.model} on {device}, batch {args.batch_size} (DP: Poisson, q = {rate:.4f}),"
          f" {args.steps} steps x {args.repeats} repeats\n")
    print(f"{'loop':<6} {'tokens/s':>10} {'peak GiB':>9}")
    summary = {}
    for name, rows in results.items():
        tps = statistics.median(r[0] for r in rows)
        peak = max(r[1] for r in rows)
        summary[name] = (tps, peak)
        print(f"{name:<6} {tps:>10.0f} {peak:>9.2f}" if cuda else f"{name:<6} {tps:>10.0f} {'n/a':>9}")
    ratio = summary["dp"][0] / summary["plain"][0]
    print(f"\nDP throughput / plain: {ratio:.2f}x (DP costs {(1 - ratio) * 100:.1f} % of throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
