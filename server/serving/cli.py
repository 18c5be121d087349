"""``finlora serve``: parse and check the command line, load the base model once, register adapters, serve.

Checked before the model loads (a second, not minutes): every ``--adapter NAME=DIR`` and every adapter directory
under ``--adapters-dir`` (one PEFT directory per adapter, or a federation run directory whose ``round-<k>``
folders become adapters ``round-<k>``), every ``--moe NAME=DIR`` (a ``finlora moe train`` directory), names unique,
the port bindable.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finlora.common.adapter import CONFIG_FILE, AdapterError
from finlora.common.config import ConfigError, load_config
from finlora.common.logs import get_logger
from finlora.common.moe import MOE_CONFIG, MixtureError, load_mixture
from finlora.common.preflight import check_model
from finlora.server.serving.adapters import BASE_MODEL
from finlora.server.serving.mixture import MixtureStore

log = get_logger(__name__)

ADMIN_TOKEN_ENV = "FINLORA_SERVE_ADMIN_TOKEN"


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve many LoRA adapters on one base model (OpenAI-compatible HTTP API)",
                           description="Serve many LoRA adapters on one base model: OpenAI-compatible "
                                       "/v1/completions and /v1/chat/completions, where the request's 'model' "
                                       "names the adapter; requests for different adapters share forward passes.")
    serve.add_argument("--model", help="base model: tiny, smollm2, a hub id or a directory (default: model.name)")
    serve.add_argument("--quantization", choices=["auto", "4", "8", "none"], help="model.quantization")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve the PEFT adapter in DIR as model NAME (repeatable)")
    serve.add_argument("--adapters-dir", metavar="DIR",
                       help="serve every adapter directory under DIR, named after its folder")
    serve.add_argument("--moe", action="append", default=[], metavar="NAME=DIR",
                       help="serve the mixture of experts in DIR ('finlora moe train') as model NAME, on its own "
                            "copy of the base model (repeatable)")
    serve.add_argument("--max-loras", type=int, default=8, help="adapters attached at once (LRU; default 8)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests per forward pass (default 32)")
    serve.add_argument("--mixed-batch", choices=["gathered", "peft"], default="gathered",
                       help="how a batch mixing adapters runs: stacked A/B and two batched matmuls per layer "
                            "(gathered, default) or PEFT's loop over the batch's adapters (peft)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help=f"file holding the admin token (or set {ADMIN_TOKEN_ENV}); without one the admin "
                            "endpoints answer loopback clients only")
    serve.set_defaults(func=cmd_serve)


def adapter_specs(pairs: list[str], adapters_dir: str | None) -> dict[str, Path]:
    """``{name: directory}`` from the command line; every error names the argument and what was expected."""
    specs: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair!r}: expected NAME=DIR")
        if name in specs:
            raise ConfigError(f"--adapter {pair!r}: the name {name!r} is given twice")
        specs[name] = Path(path).expanduser()
    if adapters_dir:
        root = Path(adapters_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--adapters-dir {adapters_dir}: no such directory")
        found = sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
        if not found:
            raise ConfigError(f"--adapters-dir {adapters_dir}: no adapter directories ({CONFIG_FILE}) in it")
        for path in found:
            if path.name in specs:
                raise ConfigError(f"--adapters-dir {adapters_dir}: {path.name!r} is also given with --adapter")
            specs[path.name] = path
    for name, path in specs.items():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"--adapter {name}={path}: not a PEFT adapter directory ({CONFIG_FILE} expected)")
    return specs


def mixture_specs(pairs: list[str], adapter_names: Iterable[str]) -> dict[str, Path]:
    """``{name: mixture directory}`` from ``--moe``; a name may not repeat or shadow an adapter."""
    specs: dict[str, Path] = {}
    taken = set(adapter_names)
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--moe {pair!r}: expected NAME=DIR")
        if name in specs or name in taken or name == BASE_MODEL or "/" in name:
            raise ConfigError(f"--moe {pair!r}: the name {name!r} is taken (another --moe, an adapter or "
                              f"{BASE_MODEL!r}) or has a '/'")
        if not (Path(path).expanduser() / MOE_CONFIG).is_file():
            raise ConfigError(f"--moe {pair!r}: no {MOE_CONFIG} in {path} (expected a 'finlora moe train' directory)")
        specs[name] = Path(path).expanduser()
    return specs


def _admin_token(path: str | None) -> str | None:
    if path:
        token = Path(path).expanduser().read_text().strip()
        if len(token) < 16:
            raise ConfigError(f"--admin-token-file {path}: the token must be at least 16 characters")
        return token
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # heavy web stack: only `finlora serve` pays for it
    from peft import get_peft_model

    from finlora.common.model import load_base_model, lora_config, resolve_model_path
    from finlora.server.serving.adapters import AdapterStore, read_host_adapter
    from finlora.server.serving.api import create_app  # imports FastAPI
    from finlora.server.serving.engine import GenerationEngine

    overrides = {k: v for k, v in (("model.name", args.model), ("model.quantization", args.quantization)) if v}
    cfg = load_config(overrides)
    if args.max_loras < 1 or args.max_batch < 1:
        raise ConfigError("--max-loras and --max-batch must be at least 1")
    check_model(cfg.model.name, "--model")
    specs = adapter_specs(args.adapter, args.adapters_dir)
    moe_specs = mixture_specs(args.moe, specs)
    token = _admin_token(args.admin_token_file)
    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not token:
        print("finlora serve: no admin token: adapters can be added/removed only from this machine", file=sys.stderr)

    adapters = []
    for name, path in specs.items():
        try:
            adapters.append(read_host_adapter(name, path))
        except AdapterError as exc:
            raise ConfigError(f"--adapter {name}={path}: {exc}") from exc
    model, tokenizer, effective = load_base_model(cfg.model)
    # PEFT needs one adapter to build the wrapper: a LoRA of rank r whose B is zero, never named in a batch.
    placeholder = lora_config(cfg.lora, resolve_model_path(cfg.model.name))
    peft_model = get_peft_model(model, placeholder, adapter_name=f"__finlora_placeholder_{secrets.token_hex(4)}")
    peft_model.eval()
    store = AdapterStore(peft_model, args.max_loras)
    for adapter in adapters:
        store.register(adapter)
    mixtures = {}
    for name, moe_dir in moe_specs.items():  # each on its own base model: X-LoRA rewires the model it wraps
        try:
            mixture = load_mixture(load_base_model(cfg.model)[0], moe_dir)
        except MixtureError as exc:
            raise ConfigError(f"--moe {name}={moe_dir}: {exc}") from exc
        mixtures[name] = GenerationEngine(MixtureStore(name, mixture, moe_dir), tokenizer, max_batch=args.max_batch,
                                          mixed_batch="none")
    engine = GenerationEngine(store, tokenizer, max_batch=args.max_batch, mixed_batch=args.mixed_batch)
    for running in (engine, *mixtures.values()):
        running.start()
    app = create_app(store, engine, base_name=cfg.model.name, admin_token=token, mixtures=mixtures)
    print(f"finlora serve: {cfg.model.name} (quantization {effective}), {len(adapters)} adapter(s) "
          f"[{', '.join(a.name for a in adapters)}], at most {args.max_loras} attached"
          + (f", mixture(s) [{', '.join(mixtures)}]" if mixtures else "")
          + f"; http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for running in (engine, *mixtures.values()):
            running.stop()
        print(f"finlora serve: stopped after {engine.batches} batches, {engine.rows} requests", flush=True)
    return 0
