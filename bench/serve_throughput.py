"""Multi-adapter serving throughput: finlora serve's engine against PEFT's naive way, in the same process and run.

For 1, 8 and 64 distinct adapters in the request mix (requests spread evenly over them), the same requests are
served two ways on the same base model:

* **PEFT naive**: every adapter loaded into one ``PeftModel``; for each request, ``set_adapter`` then ``generate``
  (greedy), one request at a time;
* **finlora engine**: all requests submitted at once to :class:`~finlora.server.serving.engine.GenerationEngine`,
  which decodes mixed-adapter batches with the KV cache, twice: with PEFT's mixed batch (``adapter_names=``, a
  loop over the batch's adapters in every layer) and with the gathered forward (``--mixed-batch gathered``, the
  default of ``finlora serve``: stacked A/B, two batched matmuls per layer).

Prints requests/s, generated tokens/s, the ratio, how many answers agree, and the process's resident memory.
Printed, not asserted. Default: the tiny model; ``--model smollm2`` for the real one.

    python bench/serve_throughput.py [--model tiny] [--requests 64] [--max-tokens 16] [--mixes 1,8,64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from peft import PeftModel, get_peft_model

from finlora.common.adapter import initial_adapter, save_adapter_dir
from finlora.common.config import load_config
from finlora.common.data import read_jsonl
from finlora.common.model import load_base_model, lora_config, lora_shapes, resolve_model_path
from finlora.common.sample_data import sentiment_rows
from finlora.eval.tasks import resolve_test_dir
from finlora.server.serving.adapters import AdapterStore, read_host_adapter
from finlora.server.serving.engine import GenerationEngine, GenerationRequest


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def make_adapters(cfg, root: Path, n: int) -> list[Path]:
    shapes = lora_shapes(cfg.model, cfg.lora)
    peft_config = lora_config(cfg.lora, resolve_model_path(cfg.model.name))
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arrays = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) if ".lora_B." in k else v
                  for k, v in initial_adapter(shapes, seed=i).items()}
        save_adapter_dir(arrays, peft_config, root / f"adapter-{i}")
        paths.append(root / f"adapter-{i}")
    return paths


def prompts(n: int) -> list[str]:
    test = resolve_test_dir(None)
    rows = read_jsonl(test / "fpb.jsonl") if test is not None and (test / "fpb.jsonl").is_file() else \
        sentiment_rows(n=n, seed=7)
    return [r["context"] for r in rows[:n]] * (n // max(1, len(rows[:n])) + 1)


def naive(model, tokenizer, jobs: list[tuple[str, str]], max_tokens: int) -> tuple[float, list[str], int]:
    start, texts, generated = time.perf_counter(), [], 0
    with torch.inference_mode():
        for adapter, prompt in jobs:
            model.set_adapter(adapter)
            enc = tokenizer([prompt], return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:]
            new = new[new != tokenizer.eos_token_id]
            generated += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return time.perf_counter() - start, texts, generated


def engine_run(engine: GenerationEngine, jobs: list[tuple[str, str]], max_tokens: int) -> tuple[float, list[str], int]:
    start = time.perf_counter()
    requests = [engine.submit(GenerationRequest(adapter=a, prompt=p, max_tokens=max_tokens)) for a, p in jobs]
    results = [r.result.result(timeout=3600) for r in requests]
    return time.perf_counter() - start, [r.text for r in results], sum(r.completion_tokens for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--mixes", default="1,8,64", help="distinct adapters in the request mix")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    mixes = [int(x) for x in args.mixes.split(",")]
    cfg = load_config({"model.name": args.model, "model.quantization": "none"})
    torch.manual_seed(0)
    base_rss = rss_gib()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(cfg, Path(tmp), max(mixes))
        model, tokenizer, _ = load_base_model(cfg.model)
        model_rss = rss_gib()
        # naive: one PeftModel holding every adapter
        naive_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="adapter-0")
        for i, path in enumerate(paths[1:], start=1):
            naive_model.load_adapter(str(path), adapter_name=f"adapter-{i}")
        naive_model.eval()
        naive_rss = rss_gib()
        all_prompts = prompts(args.requests)[:args.requests]
        print(f"model {args.model} on cpu, {args.requests} requests of up to {args.max_tokens} new tokens (greedy); "
              f"RSS: base model {model_rss - base_rss:.2f} GiB, + {len(paths)} adapters in PEFT "
              f"{naive_rss - model_rss:.3f} GiB")
        print(f"{'adapters':>8}  {'way':>13}  {'req/s':>7}  {'tok/s':>8}  {'vs naive':>8}  {'same text':>9}  "
              f"{'passes':>6}")
        naive(naive_model, tokenizer, [("adapter-0", all_prompts[0])] * 2, args.max_tokens)  # warm-up, not timed
        for mix in mixes:
            jobs = [(f"adapter-{i % mix}", p) for i, p in enumerate(all_prompts)]
            naive_s, naive_texts, naive_tokens = naive(naive_model, tokenizer, jobs, args.max_tokens)
            # the engine: its own PeftModel wrapper on the same base weights (the naive adapters are unloaded first)
            unwrapped = naive_model.unload()
            served = get_peft_model(unwrapped, lora_config(cfg.lora, resolve_model_path(cfg.model.name)),
                                    adapter_name="__placeholder__").eval()
            store = AdapterStore(served, max_active=mix)
            for i in range(mix):
                store.register(read_host_adapter(f"adapter-{i}", paths[i]))
            print(f"{mix:>8}  {'PEFT naive':>13}  {len(jobs) / naive_s:>7.2f}  {naive_tokens / naive_s:>8.1f}  "
                  f"{'1.00x':>8}  {'-':>9}  {'-':>6}")
            row = {"adapters": mix, "requests": len(jobs), "naive_s": naive_s, "naive_tokens": naive_tokens}
            for way in ("peft", "gathered"):
                engine = GenerationEngine(store, tokenizer, max_batch=args.max_batch, mixed_batch=way)
                engine.start()
                # warm-up, not timed: one request per adapter, so every adapter is attached (as the naive model
                # has every adapter loaded before its timing starts); attaching is reported separately
                attach_start = time.perf_counter()
                engine_run(engine, [(f"adapter-{i}", all_prompts[0]) for i in range(mix)], 1)
                warmup_s = time.perf_counter() - attach_start
                engine.forward_passes = 0
                engine_s, engine_texts, engine_tokens = engine_run(engine, jobs, args.max_tokens)
                passes = engine.forward_passes
                engine.stop()
                if engine.gathered is not None:
                    engine.gathered.close()
                same = sum(a == b for a, b in zip(naive_texts, engine_texts))
                ratio = naive_s / engine_s
                print(f"{'':>8}  {'engine ' + engine.mixed_batch:>13}  {len(jobs) / engine_s:>7.2f}  "
                      f"{engine_tokens / engine_s:>8.1f}  {ratio:>7.2f}x  {same:>4}/{len(jobs):<4}  {passes:>6}"
                      f"   (warm-up {warmup_s:.2f} s)")
                row[way] = {"engine_s": engine_s, "engine_warmup_attach_s": warmup_s, "engine_tokens": engine_tokens,
                            "ratio": ratio, "same_text": same, "engine_forward_passes": passes}
            row["rss_gib"] = rss_gib()
            results.append(row)
            # rebuild the naive model on the (now plain) base for the next mix
            base = served.unload()
            naive_model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="adapter-0")
            for i, path in enumerate(paths[1:], start=1):
                naive_model.load_adapter(str(path), adapter_name=f"adapter-{i}")
            naive_model.eval()
    print(f"peak RSS {rss_gib():.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
