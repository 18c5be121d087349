"""Gathered LoRA for mixed-adapter batches: two batched matmuls per layer, whatever the number of adapters.

PEFT applies a mixed batch (``adapter_names=``) adapter by adapter: in every LoRA layer it loops over the
batch's distinct adapters and runs one small A/B matmul pair on each one's rows. With 64 adapters in a batch
that Python loop, not the arithmetic, is the cost (bench/RESULTS.md, "Multi-adapter serving"). Punica's and
S-LoRA's answer on GPUs is a gathered kernel (BGMV): stack every adapter's A and B per layer and let each row
pick its own. Here the same with plain torch: per layer, ``index_select`` the rows' A and B (scaling folded in)
and run two ``bmm``; a row without an adapter picks slot 0, all zeros.

How it plugs into PEFT without replacing its layers: for the pass, every LoRA layer's list of active adapters is
empty, so PEFT's plain forward computes only the base layer, quantized or not, and a forward hook on each LoRA
layer adds the gathered delta. (Not ``disable_adapter()``: entering and leaving it walks every adapter's
parameters, 23 ms a pass with 64 adapters on the tiny model, more than the pass itself. Nor
``adapter_names=["__base__", ...]``: PEFT then walks every module to install and remove its per-call hooks, a fifth
of a SmolLM2 decode step, and takes its slower mixed-batch path in every layer.)
The stacks are updated from the slots' own parameters only when the adapter store copied new weights into a slot
(its ``weights_version`` changed), and then only that slot's rows, so in steady state a forward pass costs two
index_selects and two bmm per layer. Adapters this cannot express exactly (DoRA, LoRA on embeddings or
convolutions) make :func:`supported` false and the engine keeps PEFT's own mixed batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear

from finlora.server.serving.adapters import BASE_MODEL, AdapterStore


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """Every PEFT LoRA layer of ``model`` by module name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def supported(model: Any) -> bool:
    """True when every LoRA layer is a plain (optionally quantized) linear one without DoRA: what the gathered
    delta reproduces exactly."""
    for _, module in lora_layers(model):
        if module.lora_embedding_A or getattr(module, "lora_magnitude_vector", None):
            return False
        if not isinstance(module, LoraLinear) and not hasattr(module.get_base_layer(), "in_features"):
            return False
    return True


class GatheredLora:
    """Stacked A/B per LoRA layer for every slot of an :class:`AdapterStore`, and the hooks that apply them."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.layers: list[tuple[str, Any]] = []
        self._hooks: list[Any] = []
        self._version = -1
        self._slot_index: dict[str, int] = {}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacked: dict[str, int] = {}  # slot -> the store's slot version its stack rows hold
        self._rows: torch.Tensor | None = None

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self.layers = [], []

    def _hook_layers(self) -> None:
        """Hook every LoRA layer; again when a new slot put LoRA on modules that had none."""
        layers = lora_layers(self.store.model)
        if [m for _, m in layers] != [m for _, m in self.layers]:
            self.close()
            self.layers = layers
            self._hooks = [module.register_forward_hook(self._hook(name)) for name, module in layers]

    def _refresh(self) -> None:
        """Bring the stacks up to the store's weights: only the slots whose weights changed when nothing else did
        (an LRU swap copies one adapter into one slot), everything when slots or LoRA layers came, or a rank
        outgrew its stack."""
        changed = {slot for slot, version in self.store.slot_versions.items() if self._stacked.get(slot) != version}
        layers = lora_layers(self.store.model)
        slots = sorted({slot for _, module in layers for slot in module.lora_A})
        in_place = (self._stacks and [m for _, m in layers] == [m for _, m in self.layers]
                    and {s: i + 1 for i, s in enumerate(slots)} == self._slot_index
                    and all(self._fits(name, module, slot) for name, module in layers for slot in changed))
        with torch.inference_mode():  # the engine's forward passes run in it: their stacks are inference tensors
            if in_place:
                for name, module in self.layers:
                    for slot in changed:
                        self._write(name, module, slot)
            else:
                self._rebuild(slots)
        self._stacked = dict(self.store.slot_versions)
        self._version = self.store.weights_version

    def _fits(self, name: str, module: Any, slot: str) -> bool:
        """Whether ``slot``'s weights in this layer can be written into the existing stack."""
        stacks = self._stacks.get(name)
        if slot not in module.lora_A:
            return True
        return stacks is not None and module.lora_A[slot].weight.shape[0] <= stacks[0].shape[2]

    def _rebuild(self, slots: list[str]) -> None:
        """Stack every slot's weights (index 0: no adapter, zeros); ranks below the layer's largest are padded with
        zeros, which adds nothing to the product."""
        self._hook_layers()
        self._slot_index = {slot: i + 1 for i, slot in enumerate(slots)}
        self._stacks = {}
        for name, module in self.layers:
            present = [s for s in slots if s in module.lora_A]
            if not present:
                continue
            rank = max(module.lora_A[s].weight.shape[0] for s in present)
            a0, b0 = module.lora_A[present[0]].weight, module.lora_B[present[0]].weight
            # (rows, in, r) and (rows, r, out): the bmm operands, each row one slot's A^T and (scaling * B)^T
            self._stacks[name] = (torch.zeros(len(slots) + 1, a0.shape[1], rank, dtype=a0.dtype, device=a0.device),
                                  torch.zeros(len(slots) + 1, rank, b0.shape[0], dtype=b0.dtype, device=b0.device))
            for slot in present:
                self._write(name, module, slot)

    def _write(self, name: str, module: Any, slot: str) -> None:
        """Slot ``slot``'s row of this layer's stacks from its current weights (zeros where it has none)."""
        a_t, b_t = self._stacks.get(name, (None, None))
        if a_t is None:
            return
        i = self._slot_index[slot]
        a_t[i].zero_()
        b_t[i].zero_()
        if slot in module.lora_A:
            a, b = module.lora_A[slot].weight, module.lora_B[slot].weight
            a_t[i, :, : a.shape[0]] = a.T
            b_t[i, : b.shape[1]] = (b * module.scaling[slot]).T

    def _hook(self, name: str) -> Any:
        def add_delta(_module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            rows = self._rows
            stacks = self._stacks.get(name)
            if rows is None or stacks is None:
                return None
            a_t, b_t = stacks
            x = args[0]
            flat = x.dim() == 2
            x3 = (x.unsqueeze(1) if flat else x).to(a_t.dtype)
            delta = torch.bmm(torch.bmm(x3, a_t.index_select(0, rows)), b_t.index_select(0, rows))
            return output + (delta.squeeze(1) if flat else delta).to(output.dtype)
        return add_delta

    @contextmanager
    def batch(self, slot_names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Within this block, a forward pass of the model given the yielded arguments applies row i's adapter
        ``slot_names[i]`` (``BASE_MODEL`` for none) through the stacks, and none through PEFT's own path; a batch of
        one adapter runs through PEFT's own path alone."""
        if self._version != self.store.weights_version:
            self._refresh()
        device = next(iter(self._stacks.values()))[0].device if self._stacks else "cpu"
        distinct = set(slot_names)
        if len(distinct) > 1:
            self._rows = torch.tensor([0 if s == BASE_MODEL else self._slot_index[s] for s in slot_names],
                                      dtype=torch.long, device=device)
            own: list[str] = []  # PEFT's plain forward computes the base layer only; the hooks add each row's delta
        else:  # one adapter for every row: PEFT's single-adapter forward (one matmul pair) beats gathering
            own = [] if distinct == {BASE_MODEL} else list(distinct)
        active = [(module, module.active_adapter) for _, module in self.layers]
        try:
            for module, _ in active:
                module._active_adapter = own
            yield {}
        finally:
            for module, names in active:
                module._active_adapter = names
            self._rows = None
