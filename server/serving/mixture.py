"""A mixture of LoRA experts (``finlora moe train``) served under one model name, beside the plain adapters.

An X-LoRA mixture is a model of its own: its router reads the hidden states of a first pass to weigh the experts
in a second one, so its rows cannot share a forward pass with other adapters' rows, and its scaling pass keeps no
KV cache. ``finlora serve --moe NAME=DIR`` therefore gives each mixture its own copy of the base model and its own
decoding loop — the same engine (continuous batching, streaming, stop strings, sampling) over a one-model store —
whose forward passes re-read the whole sequence instead of a cache. Requests name the mixture like an adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finlora.common.moe import read_mixture_spec
from finlora.server.serving.adapters import BASE_MODEL, UnknownAdapter


class MixtureStore:
    """The store interface the engine needs, for one model that *is* the mixture: nothing to attach or swap."""

    max_active = 1

    def __init__(self, name: str, model: Any, moe_dir: Path) -> None:
        if not name or name == BASE_MODEL or "/" in name:
            raise ValueError(f"mixture name {name!r}: expected a non-empty name without '/' other than {BASE_MODEL!r}")
        self.name = name
        self.model = model
        experts, depth, _, _ = read_mixture_spec(moe_dir)
        self.description = {"source": str(Path(moe_dir).resolve()), "experts": sorted(experts), "depth": depth}

    def names(self) -> list[str]:
        return [self.name]

    def has(self, name: str) -> bool:
        return name == self.name

    def active(self) -> list[str]:
        return [self.name]

    def slot(self, name: str) -> str:
        return name

    def attach(self, names: set[str]) -> None:
        unknown = set(names) - {self.name}
        if unknown:
            raise UnknownAdapter(sorted(unknown)[0])

    def release(self, names: set[str]) -> None:
        return None
