"""Score a *served* adapter: ``finlora eval --endpoint URL --adapter NAME`` asks an OpenAI-compatible server.

Any server with ``/v1/models`` and ``/v1/completions`` works (``finlora serve``, vLLM with LoRA adapters). The
benchmark's generation protocol is kept: the same prompts, greedy decoding, the task's ``max_new_tokens``, and
FinLoRA's answer rule on the continuation. Only FinLoRA mode is possible: fast mode scores labels by their
log-likelihood, which the completions API does not return for arbitrary continuations. Requests are sent
``batch_size`` at a time, concurrently, so the server can batch them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from finlora.eval.tasks import EvalError


class EndpointModel:
    """The served model named ``adapter`` at ``url``; stands in for a local model in the eval runner."""

    def __init__(self, url: str, adapter: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.adapter = adapter
        self.timeout_s = timeout_s

    def check(self) -> None:
        """Fail fast, naming the URL or the adapter, before any task runs."""
        try:
            reply = httpx.get(f"{self.url}/v1/models", timeout=30)
        except httpx.HTTPError as exc:
            raise EvalError(f"--endpoint {self.url}: no OpenAI-compatible server answers there ({exc})") from exc
        if reply.status_code != 200:
            raise EvalError(f"--endpoint {self.url}: GET /v1/models answered {reply.status_code}")
        served = [m.get("id") for m in reply.json().get("data", [])]
        if self.adapter not in served:
            raise EvalError(f"--adapter {self.adapter}: not served at {self.url} (it serves: {', '.join(served)})")

    def _complete(self, client: httpx.Client, prompt: str, max_new_tokens: int) -> str:
        body = {"model": self.adapter, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0}
        reply = client.post(f"{self.url}/v1/completions", json=body)
        if reply.status_code != 200:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text[:300]
            raise EvalError(f"--endpoint {self.url}: /v1/completions answered {reply.status_code}: {message}")
        return reply.json()["choices"][0]["text"]

    def generate_texts(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                       on_batch: Callable[[int], None] | None = None) -> tuple[list[str], int, int]:
        """Continuations of ``prompts``, in order; the same return shape as :func:`eval.generate.generate_texts`."""
        texts: list[str] = []
        with httpx.Client(timeout=self.timeout_s) as client, ThreadPoolExecutor(batch_size) as pool:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                texts += pool.map(lambda p: self._complete(client, p, max_new_tokens), chunk)
                if on_batch:
                    on_batch(len(chunk))
        return texts, batch_size, 0
