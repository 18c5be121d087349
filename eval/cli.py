"""``finlora eval``: score a base model plus an optional PEFT adapter on the FinLoRA benchmark.

Thin on purpose: check the inputs (so a typo fails in a second, with exit code 2, not after the model has
loaded), load the model, call :func:`eval.runner.evaluate_model`, print the table. Defaults come from the
``eval.*`` keys of the config tree, like every other finlora command.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from finlora.common.adapter import AdapterError, read_adapter_dir
from finlora.common.config import load_config
from finlora.common.model import load_base_model
from finlora.common.moe import MOE_CONFIG, MixtureError, load_mixture, mixture_experts
from finlora.common.preflight import check_model, hub_offline
from finlora.eval.compare import COMPARISON_PLOT, COMPARISON_TABLE, compare_models
from finlora.eval.endpoint import EndpointModel
from finlora.eval.report import TABLE_FILE
from finlora.eval.runner import MODES, evaluate_model
from finlora.eval.tasks import EvalError, resolve_task_names, resolve_test_dir


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on ``finlora``'s subparsers."""
    p = sub.add_parser("eval", help="score a model (+ adapter) on the FinLoRA benchmark",
                       description="Score a base model plus a PEFT adapter (or none) on FinLoRA benchmark tasks; "
                                   "writes results.json, results.md, results.png and predictions/<task>.jsonl.")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory, e.g. runs/RUN/round-3 (default: none); "
                                                    "with --endpoint, the served adapter's name")
    p.add_argument("--moe", metavar="DIR", help="a mixture of LoRA experts from 'finlora moe train' (instead of "
                                                "--adapter)")
    p.add_argument("--endpoint", metavar="URL", help="score an adapter served at this OpenAI-compatible URL "
                                                     "(finlora serve, vLLM) instead of loading a model; finlora mode")
    _add_scoring_arguments(p, "eval")
    p.set_defaults(func=cmd_eval)
    return p


def _add_scoring_arguments(p: argparse.ArgumentParser, out_prefix: str) -> None:
    """What every scoring command takes: the model, the tasks and rows, the protocol, where results go."""
    p.add_argument("--model", default=None,
                   help="tiny | smollm2 | hub id | local path or .gguf file (default: config model.name)")
    p.add_argument("--quantization", choices=["auto", "4", "8", "none"],
                   help="config model.quantization: auto = 4-bit on a GPU, none on a CPU; 4 or 8 always quantize")
    p.add_argument("--data-dir", metavar="DIR", help="directory of <task>.jsonl test files "
                                                     "(default: config eval.data-dir or ../shared/data/test)")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all' (default all)")
    p.add_argument("--max-samples", type=int, default=0, metavar="N", help="first N rows per task (default 0 = all)")
    p.add_argument("--mode", choices=list(MODES), help="finlora (reference protocol) or fast (default: eval.mode)")
    p.add_argument("--batch-size", type=int, help="starting batch size, halved on OOM (default: eval.batch-size)")
    p.add_argument("--out", metavar="DIR", help=f"output directory (default runs/{out_prefix}-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_eval_model(model_name: str, quantization: str, adapter: str | None,
                    moe: str | None = None) -> tuple[Any, Any]:
    """Base model (+ adapter via ``PeftModel.from_pretrained``, or + a mixture of experts); any adapter rank or
    target modules work."""
    if adapter:
        path = Path(adapter).expanduser()
        if not path.is_dir():
            raise EvalError(f"--adapter {adapter}: no such adapter directory")
        try:
            read_adapter_dir(path)
        except AdapterError as exc:
            raise EvalError(f"--adapter {adapter}: {exc}") from exc
    cfg = load_config({"model.name": model_name, "model.quantization": quantization})
    try:
        model, tokenizer, _ = load_base_model(cfg.model)
    except OSError as exc:  # unknown hub id offline, or a directory without a model
        raise EvalError(f"--model {model_name}: cannot load it ({exc.__class__.__name__}: {exc})") from exc
    if moe:
        try:
            model = load_mixture(model, Path(moe))
        except MixtureError as exc:
            raise EvalError(f"--moe {moe}: {exc}") from exc
    elif adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
    return model.eval(), tokenizer


def add_compare_parser(moe_sub: Any) -> argparse.ArgumentParser:
    """Register ``finlora moe compare`` (on the ``moe`` subcommand's subparsers)."""
    p = moe_sub.add_parser("compare", help="score a mixture against each of its experts and a multi-task adapter",
                           description="Score a mixture of experts, each of its expert adapters and (optionally) "
                                       "one multi-task adapter trained with the same budget on the same tasks and "
                                       "rows; writes comparison.json, comparison.md and comparison.png, and each "
                                       "candidate's own results under <out>/<candidate>/.")
    p.add_argument("--moe", required=True, metavar="DIR", help="the mixture ('finlora moe train' directory)")
    p.add_argument("--multitask", metavar="DIR", help="a PEFT adapter trained on all the experts' tasks together")
    _add_scoring_arguments(p, "compare")
    p.set_defaults(func=cmd_moe_compare)
    return p


def cmd_moe_compare(args: argparse.Namespace) -> int:
    """Check every input first (the mixture, its experts, the multi-task adapter), then score them one by one."""
    cfg = load_config()
    model_name = args.model or cfg.model.name
    if hub_offline():  # as in eval: no hub round-trips (and retries) unless FINLORA_ONLINE=1
        os.environ["HF_HUB_OFFLINE"] = "1"
    check_model(model_name, "--model")
    try:
        experts = mixture_experts(Path(args.moe))
    except MixtureError as exc:
        raise EvalError(f"--moe {args.moe}: {exc}") from exc
    candidates: dict[str, Path | None] = {f"expert-{name}": path for name, path in experts.items()}
    if args.multitask:
        if not (Path(args.multitask).expanduser() / "adapter_config.json").is_file():
            raise EvalError(f"--multitask {args.multitask}: no adapter_config.json there (expected a PEFT adapter "
                            f"directory)")
        candidates["multitask"] = Path(args.multitask).expanduser()
    candidates["mixture"] = None
    mode = args.mode or cfg.eval.mode
    batch_size, names, data_dir, out = run_inputs(args, cfg, default_prefix="compare")
    quantization = args.quantization or cfg.model.quantization

    def loader(adapter: Path | None):  # noqa: ANN202 - one candidate, loaded when its turn comes
        if adapter is None:
            return lambda: load_eval_model(model_name, quantization, None, args.moe)
        return lambda: load_eval_model(model_name, quantization, str(adapter))

    print(f"finlora moe compare: model {model_name}, {len(candidates)} candidates ({', '.join(candidates)}), mode "
          f"{mode}, {len(names)} task(s) ({', '.join(names)}), max samples {args.max_samples or 'all'}\n"
          f"  output: {out}", flush=True)
    compare_models({name: loader(path) for name, path in candidates.items()}, names, data_dir, args.max_samples,
                   mode, batch_size, out, progress=not args.no_progress,
                   title=f"{model_name}: mixture vs experts ({mode} mode)")
    print((out / COMPARISON_TABLE).read_text(), end="")
    print(f"finlora moe compare: table {out / COMPARISON_TABLE}, chart {out / COMPARISON_PLOT}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Check inputs, load the model, evaluate, write outputs, print the table; returns the exit code."""
    cfg = load_config()
    if args.endpoint:
        return _eval_endpoint(args, cfg)
    model_name = args.model or cfg.model.name
    if hub_offline():  # as in simulate: no hub round-trips (and retries) unless FINLORA_ONLINE=1
        os.environ["HF_HUB_OFFLINE"] = "1"
    check_model(model_name, "--model")  # in a second, before torch and the model load
    if args.adapter and not Path(args.adapter).expanduser().is_dir():
        raise EvalError(f"--adapter {args.adapter}: no such adapter directory")
    if args.adapter and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {args.adapter}: no adapter_config.json there (expected a PEFT adapter "
                        f"directory such as runs/<run-id>/round-3)")
    if args.moe and args.adapter:
        raise EvalError("--moe and --adapter: give one (a mixture already names its expert adapters)")
    if args.moe and not (Path(args.moe).expanduser() / MOE_CONFIG).is_file():
        raise EvalError(f"--moe {args.moe}: no {MOE_CONFIG} there (expected a 'finlora moe train' directory)")
    mode = args.mode or cfg.eval.mode
    batch_size, names, data_dir, out = run_inputs(args, cfg)
    what = args.adapter or (f"mixture {args.moe}" if args.moe else "no adapter")
    print(f"finlora eval: model {model_name} + {what}, mode {mode}, {len(names)} task(s) ({', '.join(names)}), "
          f"data {resolve_test_dir(data_dir)}, max samples {args.max_samples or 'all'}, batch {batch_size}\n"
          f"  output: {out}", flush=True)
    model, tokenizer = load_eval_model(model_name, args.quantization or cfg.model.quantization, args.adapter,
                                       args.moe)
    title = f"{model_name} + {what} ({mode} mode)"
    evaluate_model(model, tokenizer, names, data_dir or None, args.max_samples, mode, batch_size, out,
                   progress=not args.no_progress, title=title)
    print((out / TABLE_FILE).read_text(), end="")
    print(f"finlora eval: results in {out}/results.json, predictions in {out}/predictions/")
    return 0


def run_inputs(args: argparse.Namespace, cfg: Any, default_prefix: str = "eval",
               ) -> tuple[int, list[str], str | None, Path]:
    """Batch size, task names, data directory and output directory, each checked (errors name the flag)."""
    batch_size = args.batch_size or cfg.eval.batch_size
    if args.max_samples < 0 or batch_size < 1:
        raise EvalError("--max-samples must be >= 0 and --batch-size >= 1")
    names = resolve_task_names(args.tasks)
    data_dir = args.data_dir or cfg.eval.data_dir
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise EvalError(f"--data-dir {data_dir}: no such directory")
    out = Path(args.out or Path("runs") / time.strftime(f"{default_prefix}-%Y%m%d-%H%M%S")).expanduser().resolve()
    return batch_size, names, data_dir or None, out


def _eval_endpoint(args: argparse.Namespace, cfg: Any) -> int:
    """``--endpoint URL --adapter NAME``: the same tasks, rows, protocol and outputs, over HTTP."""
    if not args.adapter:
        raise EvalError("--endpoint needs --adapter NAME (the served adapter, as GET /v1/models lists it; "
                        "__base__ for the base model)")
    if args.mode == "fast":
        raise EvalError("--mode fast needs label log-likelihoods, which a completions endpoint does not return; "
                        "use --mode finlora with --endpoint")
    batch_size, names, data_dir, out = run_inputs(args, cfg)
    model = EndpointModel(args.endpoint, args.adapter)
    model.check()
    print(f"finlora eval: endpoint {model.url}, adapter {args.adapter}, mode finlora, {len(names)} task(s) "
          f"({', '.join(names)}), data {resolve_test_dir(data_dir)}, max samples {args.max_samples or 'all'}, "
          f"{batch_size} concurrent requests\n  output: {out}", flush=True)
    evaluate_model(model, None, names, data_dir or None, args.max_samples, "finlora", batch_size, out,
                   progress=not args.no_progress, title=f"{args.adapter} at {model.url} (finlora mode)")
    print((out / TABLE_FILE).read_text(), end="")
    print(f"finlora eval: results in {out}/results.json, predictions in {out}/predictions/")
    return 0
