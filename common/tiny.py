"""The built-in ``tiny`` model: a small Llama with its own offline tokenizer.

Nothing can be fetched from the hub in CI or on an air-gapped institution's test box, yet every code path
(PEFT adapters, Flower transport, saving, loading) should run for real. So ``tiny`` is a genuine
``LlamaForCausalLM`` built from a ``LlamaConfig`` with a byte-level BPE tokenizer trained in-process on the
built-in sample text. Both are deterministic and written once (atomically) to a cache directory, so every
process, the server's and each client's, loads byte-identical weights, and a saved adapter's
``base_model_name_or_path`` points at a real directory that ``PeftModel.from_pretrained`` can use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from finlora.common.io import cache_root
from finlora.common.logs import get_logger
from finlora.common.sample_data import sentiment_rows

log = get_logger(__name__)

TINY_NAME = "tiny"
TINY_VERSION = "v1"
"""Bump when the recipe below changes, so stale caches are not reused."""

TINY_VOCAB_SIZE = 640
TINY_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024)


def tiny_model_dir() -> Path:
    """Directory of the tiny model, built on first use."""
    target = cache_root() / f"tiny-llama-{TINY_VERSION}"
    if not (target / "config.json").exists():
        _build_atomically(target)
    return target


def _tokenizer_corpus() -> list[str]:
    rows = sentiment_rows(n=1200, seed=12345)
    extra = ["Instruction: What is the entity type of the following? Answer: person organization location",
             "XBRL tag value formula revenue assets liabilities equity cash flow earnings per share",
             "0 1 2 3 4 5 6 7 8 9 % $ EUR USD million billion , . : ; ( ) { } / - +"]
    return [r["context"] + r["target"] for r in rows] + extra


def build_tiny(out_dir: Path) -> None:
    """Write the tiny model and tokenizer to ``out_dir`` (deterministic)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=TINY_SPECIAL_TOKENS[0],
                                        eos_token=TINY_SPECIAL_TOKENS[1], pad_token=TINY_SPECIAL_TOKENS[2])
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **TINY_SHAPE)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_atomically(target: Path) -> None:
    """Build into a temp dir beside ``target`` and rename it into place.

    Several Ray actors may race to build on first use; the rename makes exactly one build win and no
    process ever sees a half-written directory.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        log.info("building the tiny model once into %s", target)
        build_tiny(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def directory_digest(path: Path) -> str:
    """sha256 over the files of a directory (names and bytes), to check determinism."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()
