"""One decoding loop for every adapter: requests for different adapters share each forward pass.

PEFT runs a mixed batch in one pass when the forward gets ``adapter_names=[one name per row]`` (each LoRA layer
applies each adapter to its own rows; ``__base__`` rows get none). The loop here takes whatever requests are
waiting (up to ``max_batch``, after at most ``max_wait_s`` for more to arrive), prefills them together with left
padding, then decodes one token per row per step with the KV cache, handing every new piece of text to its
request's queue as it appears (that is what streaming reads). A row that is done (end of sequence, a stop string,
its own ``max_tokens``) stops emitting; the batch ends when all rows are done. Requests arriving meanwhile wait for
the next batch: iteration-level joining of a running batch (vLLM's continuous batching) is not done here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from finlora.common.logs import get_logger
from finlora.server.serving.adapters import AdapterStore

log = get_logger(__name__)

DONE = object()
"""End marker on a request's token queue."""


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
                 max_prompt_tokens: int = 2048) -> None:
        self.store = store
        self.model = store.model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self._waiting: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="finlora-serve-engine", daemon=True)
        self.batches = 0
        self.rows = 0
        self.forward_passes = 0

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
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._waiting.put(None)
                    break
                batch.append(item)
            for group in self._fit_adapters(batch):
                self._run_group(group)

    def _fit_adapters(self, batch: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Split a batch so that no group needs more distinct adapters than may be attached at once."""
        groups: list[list[GenerationRequest]] = [[]]
        names: set[str] = set()
        for request in batch:
            if request.adapter not in names and len(names) >= self.store.max_active:
                groups.append([])
                names = set()
            names.add(request.adapter)
            groups[-1].append(request)
        return groups

    def _run_group(self, group: list[GenerationRequest]) -> None:
        names = {r.adapter for r in group}
        try:
            self.store.attach(names)
        except Exception as exc:  # noqa: BLE001 - an unknown/removed adapter fails these requests, not the server
            for request in group:
                self._fail(request, exc)
            return
        try:
            self._decode(group)
        except Exception as exc:  # noqa: BLE001 - reported to each waiting request
            log.exception("serve: a batch of %d failed", len(group))
            for request in group:
                self._fail(request, exc)
        finally:
            self.store.release(names)

    @staticmethod
    def _fail(request: GenerationRequest, exc: BaseException) -> None:
        if not request.result.done():
            request.result.set_exception(exc)
        request.pieces.put(DONE)

    def _decode(self, group: list[GenerationRequest]) -> None:
        import torch

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        sides = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # a too-long prompt loses its start, not its question
        try:
            enc = tok([r.prompt for r in group], return_tensors="pt", padding=True, truncation=True,
                      max_length=min(self.max_prompt_tokens, context - 1))
        finally:
            tok.padding_side, tok.truncation_side = sides
        input_ids = enc["input_ids"].to(device)
        attention = enc["attention_mask"].to(device)
        for request, mask in zip(group, attention):
            request.prompt_tokens = int(mask.sum())
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        adapter_names = [r.adapter for r in group]
        eos = tok.eos_token_id
        generators = [self._generator(r, device) for r in group]
        generated: list[list[int]] = [[] for _ in group]
        emitted = [""] * len(group)
        finish: list[str | None] = [None] * len(group)
        past = None
        self.batches += 1
        self.rows += len(group)
        with torch.inference_mode():
            room = context - input_ids.shape[1]  # never decode past the model's context window
            for _step in range(min(max(r.max_tokens for r in group), room)):
                out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=past, use_cache=True, adapter_names=adapter_names)
                self.forward_passes += 1
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                next_ids = torch.empty(len(group), dtype=torch.long, device=device)
                for i, request in enumerate(group):
                    next_ids[i] = self._pick(logits[i], request.temperature, generators[i])
                for i, request in enumerate(group):
                    if finish[i]:
                        continue
                    token = int(next_ids[i])
                    if token == eos:
                        finish[i] = "stop"
                        continue
                    generated[i].append(token)
                    text = tok.decode(generated[i], skip_special_tokens=True)
                    cut = _first_stop(text, request.stop)
                    if cut is not None:
                        text, finish[i] = text[:cut], "stop"
                    elif len(generated[i]) >= request.max_tokens:
                        finish[i] = "length"
                    # hold back a trailing replacement char (a multi-byte character still being completed)
                    stable = text if finish[i] else text.rstrip("\ufffd")
                    if len(stable) > len(emitted[i]) and stable.startswith(emitted[i]):
                        request.pieces.put(stable[len(emitted[i]):])
                        emitted[i] = stable
                if all(finish):
                    break
                input_ids = next_ids[:, None]
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
        for i, request in enumerate(group):
            reason = finish[i] or "length"
            request.result.set_result(GenerationResult(emitted[i], request.prompt_tokens, len(generated[i]), reason))
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


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
