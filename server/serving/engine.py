"""One decoding loop for every adapter: requests for different adapters share each forward pass.

PEFT runs a mixed batch in one pass when the forward gets ``adapter_names=[one name per row]`` (each LoRA layer
applies each adapter to its own rows; ``__base__`` rows get none). The loop here keeps one running batch with its
KV cache and, at every iteration (continuous batching, as in Orca/vLLM), either admits the requests that arrived
(their prompts are prefilled in groups of similar length, left-padded, and joined to the running batch) or
decodes one more token for every running row. Each new piece of text goes to its request's queue as it appears
(that is what streaming reads). A row that is done (end of sequence, a stop string, its own ``max_tokens``, the
model's context window) leaves the batch at once and frees its adapter slot.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from finlora.common.logs import get_logger
from finlora.server.serving.adapters import BASE_MODEL, AdapterStore

log = get_logger(__name__)

DONE = object()
"""End marker on a request's token queue."""

PREFILL_PADDING = 0.15
"""Most padding a prefill group may carry, as a fraction of its real prompt tokens (:func:`length_groups`)."""


@dataclass
class GenerationRequest:
    """One prompt for one adapter; the engine fills ``tokens`` (text pieces) and resolves ``result``."""

    adapter: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    pieces: queue.Queue = field(default_factory=queue.Queue)
    result: Future = field(default_factory=Future)
    prompt_tokens: int = 0

    def stream(self) -> Iterator[str]:
        """Text pieces as they are generated (raises what the engine raised)."""
        while True:
            piece = self.pieces.get()
            if piece is DONE:
                self.result.result()  # re-raise an engine error here
                return
            yield piece


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class GenerationEngine:
    """The background decoding thread; :meth:`submit` is called from the HTTP handlers."""

    def __init__(self, store: AdapterStore, tokenizer: Any, max_batch: int = 32, max_wait_s: float = 0.01,
                 max_prompt_tokens: int = 2048, mixed_batch: str = "gathered") -> None:
        """``mixed_batch``: "gathered" applies a mixed batch's adapters with two batched matmuls per layer
        (``gathered.py``; PEFT's own path where it cannot), "peft" with PEFT's per-adapter loop, "none" for a
        store that serves one model as it is (a mixture of experts, ``mixture.py``: its forward takes no adapter
        names and keeps no KV cache, so every step re-reads the whole sequence)."""
        # torch and peft load with the model, not with this module (the HTTP layer imports it for its types)
        from finlora.server.serving import gathered

        if mixed_batch not in ("gathered", "peft", "none"):
            raise ValueError(f"mixed_batch {mixed_batch!r}: expected 'gathered', 'peft' or 'none'")
        self.store = store
        self.model = store.model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self._waiting: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="finlora-serve-engine", daemon=True)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.batches = 0
        self.rows = 0
        self.joined = 0
        self.forward_passes = 0
        if mixed_batch == "gathered" and not gathered.supported(self.model):
            mixed_batch = "peft"  # DoRA, LoRA on embeddings: PEFT's own path computes them
        self.mixed_batch = mixed_batch
        self.gathered = gathered.GatheredLora(store) if mixed_batch == "gathered" else None
        self.kv_cache = mixed_batch != "none"
        self._last_logits_only = {"logits_to_keep": 1} if _accepts_logits_to_keep(self.model) else {}
        """Only the last position's logits are read: a prefill of 64 prompts would otherwise run the LM head (49k
        vocabulary on SmolLM2) over every prompt token, a quarter of its time."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self._waiting.put(request)
        return request

    # -- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        running: list[_Row] = []
        batch: _Batch | None = None
        pending: deque[GenerationRequest] = deque()
        while True:
            if not self._collect(pending, block=not running and not pending):
                for request in [*pending, *(r.request for r in running)]:
                    self._fail(request, RuntimeError("the server is shutting down"))
                return
            admitted = self._admit(pending, running)
            try:
                if admitted:
                    new_rows, new_batch = self._prefill(admitted)
                    self.joined += len(new_rows) if running else 0
                    batch = new_batch if batch is None else batch.join(new_batch)
                    running += new_rows
                elif running and batch is not None:
                    self._step(running, batch)
            except Exception as exc:  # noqa: BLE001 - the batch's requests fail with the cause; the server goes on
                log.exception("serve: a batch of %d failed", len(running) + len(admitted))
                for row in [*running, *(_Row(r) for r in admitted if not r.result.done())]:
                    self._fail(row.request, exc)
                    self.store.release({row.request.adapter})
                running, batch = [], None
                continue
            keep = [i for i, row in enumerate(running) if row.finish is None]
            for row in running:
                if row.finish is not None:
                    self._complete(row)
            if len(keep) < len(running):
                running = [running[i] for i in keep]
                batch = batch.select(keep) if keep and batch is not None else None

    def _collect(self, pending: deque[GenerationRequest], block: bool) -> bool:
        """Move arrived requests to ``pending`` (waiting for one when idle); False once told to stop."""
        try:
            item = self._waiting.get(timeout=None) if block else self._waiting.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            pending.append(item)
            try:
                item = self._waiting.get(timeout=self.max_wait_s) if block else self._waiting.get_nowait()
            except queue.Empty:
                return True

    def _admit(self, pending: deque[GenerationRequest], running: list[_Row]) -> list[GenerationRequest]:
        """Requests that fit now: batch room, and adapter slots not pinned by running rows. Unknown adapters fail."""
        admitted: list[GenerationRequest] = []
        names = {row.request.adapter for row in running} - {BASE_MODEL}
        waiting: deque[GenerationRequest] = deque()
        while pending:
            request = pending.popleft()
            fits = len(running) + len(admitted) < self.max_batch and (
                request.adapter == BASE_MODEL or request.adapter in names or len(names) < self.store.max_active)
            if not fits:
                waiting.append(request)
                continue
            try:
                self.store.attach({request.adapter})
            except Exception as exc:  # noqa: BLE001 - an unknown or removed adapter fails this request only
                self._fail(request, exc)
                continue
            names.add(request.adapter)
            names.discard(BASE_MODEL)
            admitted.append(request)
        pending.extend(waiting)
        return admitted

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[list[_Row], _Batch]:
        """Prefill the admitted prompts in groups of similar length and join the groups into one batch.

        On a CPU (and a busy GPU) a prefill costs what its padded tokens cost: one left-padded batch of prompts of
        40 to 99 tokens spends 40 % of its work on padding. Sorting the prompts by length and cutting the sorted
        list where padding would exceed :data:`PREFILL_PADDING` keeps that waste small; the decode steps that
        follow still run every row in one pass. Rows come back in the sorted order, each with its request.
        """
        tok = self.tokenizer
        sides = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # a too-long prompt loses its start, not its question
        try:
            ids = tok([r.prompt for r in requests], padding=False, truncation=True,
                      max_length=min(self.max_prompt_tokens, self.context - 1))["input_ids"]
        finally:
            tok.padding_side, tok.truncation_side = sides
        rows: list[_Row] = []
        batch: _Batch | None = None
        for group in length_groups([len(x) for x in ids], PREFILL_PADDING):
            group_rows, group_batch = self._prefill_group([requests[i] for i in group], [ids[i] for i in group])
            rows += group_rows
            batch = group_batch if batch is None else batch.join(group_batch)
        assert batch is not None
        self.batches += 1
        return rows, batch

    def _prefill_group(self, requests: list[GenerationRequest], ids: list[list[int]]) -> tuple[list[_Row], _Batch]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        rows = []
        for request, row_ids in zip(requests, ids):
            request.prompt_tokens = len(row_ids)
            rows.append(_Row(request, generator=self._generator(request, device)))
        with torch.inference_mode(), self._adapters([self.store.slot(r.adapter) for r in requests]) as lora:
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                             use_cache=self.kv_cache, **self._last_logits_only, **lora)
        self.forward_passes += 1
        self.rows += len(rows)
        next_ids = self._advance(rows, out.logits[:, -1, :], positions[:, -1:])
        cache = out.past_key_values if self.kv_cache else input_ids
        return rows, _Batch(cache, attention, positions[:, -1:], next_ids)

    def _step(self, rows: list[_Row], batch: _Batch) -> None:
        import torch

        batch.attention = torch.cat([batch.attention, torch.ones_like(batch.attention[:, :1])], dim=1)
        batch.positions = batch.positions + 1
        with torch.inference_mode(), self._adapters([self.store.slot(r.request.adapter) for r in rows]) as lora:
            if self.kv_cache:
                out = self.model(input_ids=batch.next_ids, attention_mask=batch.attention,
                                 position_ids=batch.positions, past_key_values=batch.cache, use_cache=True, **lora)
            else:  # the cache is the sequence so far: run it all again with the new token
                ids = torch.cat([batch.cache, batch.next_ids], dim=1)
                out = self.model(input_ids=ids, attention_mask=batch.attention,
                                 position_ids=(batch.attention.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                                 **self._last_logits_only, **lora)
        self.forward_passes += 1
        batch.cache = out.past_key_values if self.kv_cache else ids
        batch.next_ids = self._advance(rows, out.logits[:, -1, :], batch.positions)

    @contextmanager
    def _adapters(self, slot_names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The forward's extra arguments for a batch whose row i uses ``slot_names[i]``."""
        if self.mixed_batch == "none":
            yield {}
            return
        if self.gathered is None:
            yield {"adapter_names": list(slot_names)}
            return
        with self.gathered.batch(slot_names) as arguments:
            yield arguments

    def _advance(self, rows: list[_Row], logits: Any, positions: Any) -> Any:
        """Pick each row's next token, emit its new text, mark finished rows; returns the next input ids."""
        import torch

        tok = self.tokenizer
        next_ids = torch.stack([self._pick(logits[i].float(), row.request.temperature, row.generator)
                                for i, row in enumerate(rows)])
        for i, row in enumerate(rows):
            token = int(next_ids[i])
            request = row.request
            if token == tok.eos_token_id:
                row.finish = "stop"
                continue
            row.generated.append(token)
            text = tok.decode(row.generated, skip_special_tokens=True)
            cut = _first_stop(text, request.stop)
            if cut is not None:
                text, row.finish = text[:cut], "stop"
            elif len(row.generated) >= request.max_tokens or int(positions[i]) + 2 >= self.context:
                row.finish = "length"
            # hold back a trailing replacement char (a multi-byte character still being completed)
            stable = text if row.finish else text.rstrip("\ufffd")
            if len(stable) > len(row.emitted) and stable.startswith(row.emitted):
                request.pieces.put(stable[len(row.emitted):])
                row.emitted = stable
        return next_ids[:, None]

    def _complete(self, row: _Row) -> None:
        request = row.request
        self.store.release({request.adapter})
        if not request.result.done():
            request.result.set_result(GenerationResult(row.emitted, request.prompt_tokens, len(row.generated),
                                                       row.finish or "length"))
        request.pieces.put(DONE)

    @staticmethod
    def _fail(request: GenerationRequest, exc: BaseException) -> None:
        if not request.result.done():
            request.result.set_exception(exc)
        request.pieces.put(DONE)

    @staticmethod
    def _generator(request: GenerationRequest, device: Any) -> Any:
        import torch

        if request.temperature <= 0:
            return None
        generator = torch.Generator(device=device)
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        return generator

    @staticmethod
    def _pick(logits: Any, temperature: float, generator: Any) -> Any:
        import torch

        if temperature <= 0:
            return torch.argmax(logits)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[0]


@dataclass
class _Row:
    """A running request: what it generated, what was sent, why it ended."""

    request: GenerationRequest
    generator: Any = None
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    finish: str | None = None


@dataclass
class _Batch:
    """The running batch's tensors: KV cache (or, for a model without one, the token ids so far), attention mask
    (left-padded), last positions, next input ids."""

    cache: Any
    attention: Any
    positions: Any
    next_ids: Any

    def join(self, other: _Batch) -> _Batch:
        """Append ``other``'s rows: both caches are left-padded to one length (the padding is masked out)."""
        import torch
        import torch.nn.functional as F

        width = max(self.attention.shape[1], other.attention.shape[1])

        def pad(t: Any, dim_from_end: int) -> Any:
            missing = width - t.shape[-dim_from_end]
            if not missing:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        if isinstance(self.cache, torch.Tensor):  # token ids: padded like the mask (masked out)
            self.cache = torch.cat([pad(self.cache, 1), pad(other.cache, 1)], dim=0)
        else:
            for mine, theirs in zip(self.cache.layers, other.cache.layers):
                mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
                mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
        self.attention = torch.cat([pad(self.attention, 1), pad(other.attention, 1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.next_ids = torch.cat([self.next_ids, other.next_ids], dim=0)
        return self

    def select(self, keep: list[int]) -> _Batch:
        """Only the rows in ``keep``; leading columns that every remaining row masks out are dropped."""
        import torch

        index = torch.tensor(keep, device=self.attention.device)
        attention = self.attention.index_select(0, index)
        start = int(attention.any(dim=0).float().argmax())
        if isinstance(self.cache, torch.Tensor):
            cache = self.cache.index_select(0, index)[:, start:]
        else:
            cache = self.cache
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]
        return _Batch(cache, attention[:, start:], self.positions.index_select(0, index),
                      self.next_ids.index_select(0, index))


def length_groups(lengths: Sequence[int], padding: float) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into groups whose left-padded size (rows x longest) stays
    within ``1 + padding`` times their real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + padding) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under ``model`` (a PEFT wrapper or a plain model) computes only the last
    ``logits_to_keep`` positions' logits when asked (transformers' Llama, Mistral, Qwen, ... do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
