"""Adapters in host memory, at most ``max_active`` of them attached to the served model (least recently used out).

S-LoRA's layout on top of PEFT: every adapter's A/B matrices stay in host memory as read from its PEFT directory;
a batch needs its adapters attached to the model (on the model's device), and attaching one more than
``max_active`` detaches the one used least recently. The model holds at most ``max_active`` adapter *slots*
(PEFT adapters named ``slot-<k>``), created once; attaching an adapter copies its weights into a free slot of the
same LoRA shape (rank, alpha, target modules). PEFT's ``add_adapter`` re-walks the whole model (0.9 s per adapter
on SmolLM2-135M here), a copy into a slot takes milliseconds, so swapping adapters under load stays cheap.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finlora.common.adapter import CONFIG_FILE, AdapterError, read_adapter_dir

BASE_MODEL = "__base__"
"""PEFT's name for "no adapter" in a mixed batch; ``finlora serve`` also lists the base model under this name."""


class UnknownAdapter(KeyError):
    """A request named an adapter that is not registered."""


@dataclass(frozen=True)
class HostAdapter:
    """One adapter as held in host memory: its LoRA arrays, its PEFT config and where it came from."""

    name: str
    arrays: dict[str, np.ndarray]
    config: Any
    source: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def read_host_adapter(name: str, path: Path) -> HostAdapter:
    """Read a PEFT adapter directory; errors name the directory and what was expected."""
    from peft import LoraConfig

    if not name or name == BASE_MODEL or "/" in name:
        raise AdapterError(f"adapter name {name!r}: expected a non-empty name without '/' other than {BASE_MODEL!r}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    arrays = read_adapter_dir(path)
    if not arrays:
        raise AdapterError(f"adapter {name!r}: {path} holds no LoRA tensors")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        config = LoraConfig(**{k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__})
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"adapter {name!r}: {path / CONFIG_FILE} is not a LoRA config: {exc}") from exc
    config.inference_mode = True
    return HostAdapter(name, arrays, config, str(path))


class AdapterStore:
    """Registered adapters (host memory) and the LRU set of those attached to ``peft_model``.

    Thread-safe: the HTTP handlers register and remove adapters while the engine thread attaches them. The engine
    calls :meth:`attach` for each batch *before* its forward pass, with every adapter the batch needs; an adapter
    in use by the running batch is never detached (the batch holds them as pinned until :meth:`release`).
    """

    def __init__(self, peft_model: Any, max_active: int) -> None:
        if max_active < 1:
            raise ValueError(f"--max-loras {max_active}: must be at least 1")
        self.model = peft_model
        self.max_active = max_active
        self._host: dict[str, HostAdapter] = {}
        self._active: OrderedDict[str, str] = OrderedDict()  # adapter name -> the slot holding it, LRU order
        self._free: list[str] = []
        self._slot_params: dict[str, dict[str, Any]] = {}
        self._slot_shape: dict[str, tuple] = {}
        self._pinned: dict[str, int] = {}
        self._lock = threading.RLock()
        self.attach_count = 0
        self.detach_count = 0
        self.weights_version = 0
        """Bumped whenever a slot's weights change (a copy in, a slot rebuilt): what a gathered forward checks."""
        self.slot_versions: dict[str, int] = {}
        """Slot -> ``weights_version`` when its weights last changed: which stack rows a gathered forward redoes."""

    # -- registry (HTTP side) --------------------------------------------------------------------------------
    def register(self, adapter: HostAdapter, replace: bool = False) -> None:
        with self._lock:
            if adapter.name in self._host and not replace:
                raise AdapterError(f"adapter {adapter.name!r} is already registered (remove it first, or replace)")
            if adapter.name in self._active and not self._pinned.get(adapter.name):
                self._detach(adapter.name)  # the next use attaches the new weights
            self._host[adapter.name] = adapter

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._host:
                raise UnknownAdapter(name)
            if self._pinned.get(name):
                raise AdapterError(f"adapter {name!r} is serving a batch right now; try again")
            del self._host[name]
            if name in self._active:
                self._detach(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._host)

    def has(self, name: str) -> bool:
        with self._lock:
            return name == BASE_MODEL or name in self._host

    def describe(self, name: str) -> dict[str, Any]:
        with self._lock:
            adapter = self._host[name]
            return {"source": adapter.source, "rank": adapter.config.r, "bytes": adapter.nbytes,
                    "active": name in self._active}

    def active(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def slot(self, name: str) -> str:
        """The PEFT adapter name to put in ``adapter_names`` for adapter ``name`` (attached and pinned)."""
        return name if name == BASE_MODEL else self._active[name]

    # -- attachment (engine side) ----------------------------------------------------------------------------
    def attach(self, names: set[str]) -> None:
        """Make every adapter in ``names`` attached and pinned (the engine's batch is about to use them)."""
        needed = {n for n in names if n != BASE_MODEL}
        with self._lock:
            missing = [n for n in needed if n not in self._host]
            if missing:
                raise UnknownAdapter(missing[0])
            if len(needed) > self.max_active:
                raise AdapterError(f"a batch needs {len(needed)} adapters, more than --max-loras {self.max_active}")
            for name in needed:
                self._pinned[name] = self._pinned.get(name, 0) + 1
            for name in sorted(needed):
                if name in self._active:
                    self._active.move_to_end(name)
                    continue
                while len(self._active) >= self.max_active:
                    victim = next(n for n in self._active if not self._pinned.get(n))
                    self._detach(victim)
                self._attach(self._host[name])

    def release(self, names: set[str]) -> None:
        with self._lock:
            for name in names:
                if name in self._pinned:
                    self._pinned[name] -= 1
                    if not self._pinned[name]:
                        del self._pinned[name]

    def _attach(self, adapter: HostAdapter) -> None:
        import torch

        shape = _lora_shape(adapter)
        slot = next((k for k in self._free if self._slot_shape[k] == shape), None)
        if slot is None:
            if len(self._slot_params) >= self.max_active:  # every slot exists: reshape a free one
                slot = self._free[0]
                self.model.delete_adapter(slot)
                del self._slot_params[slot]
            else:
                slot = f"slot-{len(self._slot_params)}"
                while slot in self._slot_params:
                    slot += "_"
            self._free = [k for k in self._free if k != slot]
            self.model.add_adapter(slot, adapter.config)
            self.model.eval()  # the new slot's modules (its LoRA dropout) are created in training mode
            marker = f".{slot}."
            self._slot_params[slot] = {k.replace(marker, "."): p for k, p in self.model.named_parameters()
                                       if marker in k}
            self._slot_shape[slot] = shape
        else:
            self._free.remove(slot)
        params = self._slot_params[slot]
        if set(params) != set(adapter.arrays):
            self._free.append(slot)
            extra = sorted(set(adapter.arrays) - set(params))[:2] or sorted(set(params) - set(adapter.arrays))[:2]
            raise AdapterError(f"adapter {adapter.name!r} ({adapter.source}) does not fit the served model: "
                               f"keys differ, e.g. {extra}")
        with torch.no_grad():
            for key, value in adapter.arrays.items():
                params[key].copy_(torch.from_numpy(value))
        self.weights_version += 1
        self.slot_versions[slot] = self.weights_version
        self._active[adapter.name] = slot
        self.attach_count += 1

    def _detach(self, name: str) -> None:
        self._free.append(self._active.pop(name))
        self.detach_count += 1


def _lora_shape(adapter: HostAdapter) -> tuple:
    """What a slot must share with an adapter to take its weights: rank, scaling and where LoRA sits."""
    config = adapter.config
    return (config.r, config.lora_alpha, bool(config.use_rslora), tuple(sorted(config.target_modules or ())),
            tuple(sorted(adapter.arrays)))
