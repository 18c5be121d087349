"""The HTTP face of ``finlora serve``: OpenAI-compatible completions over many adapters, plus adapter admin.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events, OpenAI's chunk format), and ``POST /admin/adapters`` /
``DELETE /admin/adapters/{name}`` to publish or withdraw an adapter while serving (for example each round's global
adapter). The admin endpoints need ``Authorization: Bearer <token>`` when the server was started with an admin
token, and otherwise answer only to loopback clients. Every error is an OpenAI-style JSON body with a 4xx status
that says which field was wrong; the server never dies of a request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from finlora.common.adapter import AdapterError
from finlora.server.serving.adapters import BASE_MODEL, AdapterStore, UnknownAdapter, read_host_adapter
from finlora.server.serving.engine import GenerationEngine, GenerationRequest, GenerationResult

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class ServeError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)
    replace: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The model's own chat template when it has one; otherwise plain ``role: content`` lines."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


def create_app(store: AdapterStore, engine: GenerationEngine, base_name: str, admin_token: str | None = None,
               request_timeout_s: float = 600.0, mixtures: Mapping[str, GenerationEngine] | None = None) -> FastAPI:
    """The FastAPI app over a started engine (``finlora serve`` builds both; tests may too). ``mixtures``: the
    engines of mixtures of experts served by name (``mixture.py``), each on its own copy of the base model."""
    app = FastAPI(title="finlora serve", version="1")
    openai = APIRouter(prefix="/v1")  # OpenAI's routes (models, completions, chat completions), as vLLM serves them
    started = time.time()
    mixtures = dict(mixtures or {})

    def engine_for(name: str) -> GenerationEngine:
        return mixtures.get(name, engine)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{field or 'body'}: {first.get('msg')}", param=field or None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base_model": base_name, "adapters": len(store.names()), "active": store.active(),
                "max_loras": store.max_active, "batches": engine.batches, "rows": engine.rows,
                "joined_running_batch": engine.joined, "forward_passes": engine.forward_passes,
                "mixed_batch": engine.mixed_batch, "mixtures": sorted(mixtures),
                "uptime_s": round(time.time() - started, 1)}

    @openai.get("/models")
    async def models() -> dict[str, Any]:
        data = [{"id": BASE_MODEL, "object": "model", "owned_by": "finlora", "root": base_name, "parent": None}]
        for name in store.names():
            info = store.describe(name)
            data.append({"id": name, "object": "model", "owned_by": "finlora", "root": base_name,
                         "parent": BASE_MODEL, "source": info["source"], "rank": info["rank"],
                         "active": info["active"]})
        for name, mixture in sorted(mixtures.items()):
            data.append({"id": name, "object": "model", "owned_by": "finlora", "root": base_name, "parent": None,
                         "kind": "mixture-of-experts", **mixture.store.description})
        return {"object": "list", "data": data}

    def _check_model(name: str) -> None:
        if name not in mixtures and not store.has(name):
            raise ServeError(404, f"model {name!r} is not served; GET /v1/models lists the adapters",
                             kind="not_found_error", param="model")

    async def _run(request: GenerationRequest) -> GenerationResult:
        engine_for(request.adapter).submit(request)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.result), timeout=request_timeout_s)
        except UnknownAdapter as exc:  # removed between the check and the batch
            raise ServeError(404, f"model {exc.args[0]!r} was removed", kind="not_found_error", param="model")
        except AdapterError as exc:
            raise ServeError(409, str(exc), param="model")
        except (asyncio.TimeoutError, TimeoutError):
            raise ServeError(503, f"no answer within {request_timeout_s:.0f} s; the server is overloaded",
                             kind="server_error")
        except Exception as exc:  # noqa: BLE001 - one failed batch answers 500 with the cause; the server goes on
            raise ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")

    def _request(body: _Sampling, prompt: str) -> GenerationRequest:
        return GenerationRequest(adapter=body.model, prompt=prompt, max_tokens=body.max_tokens,
                                 temperature=body.temperature, stop=body.stops(), seed=body.seed)

    @openai.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        _check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise ServeError(400, "prompt: expected a non-empty string or list of non-empty strings", param="prompt")
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            if len(prompts) != 1:
                raise ServeError(400, "prompt: streaming takes one prompt", param="prompt")
            return _sse(engine_for(body.model).submit(_request(body, prompts[0])), cid, body.model, chat=False)
        results = await asyncio.gather(*(_run(_request(body, p)) for p in prompts))
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                            for i, r in enumerate(results)],
                "usage": _usage(results)}

    @openai.post("/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        _check_model(body.model)
        prompt = chat_prompt(engine.tokenizer, body.messages)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return _sse(engine_for(body.model).submit(_request(body, prompt)), cid, body.model, chat=True)
        result = await _run(_request(body, prompt))
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": _usage([result])}

    def _admin(request: Request) -> None:
        if admin_token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
                raise ServeError(401, "admin endpoints need 'Authorization: Bearer <the server's admin token>'",
                                 kind="authentication_error")
        elif (request.client.host if request.client else "") not in LOOPBACK:
            raise ServeError(403, "admin endpoints answer only loopback clients unless the server has an admin token",
                             kind="permission_error")

    @app.post("/admin/adapters", status_code=201)
    async def add_adapter(body: AdapterUpload, request: Request) -> dict[str, Any]:
        _admin(request)
        if body.name in mixtures:
            raise ServeError(409, f"{body.name!r} is a served mixture of experts; choose another name", param="name")
        try:
            adapter = await asyncio.to_thread(read_host_adapter, body.name, Path(body.path))
            store.register(adapter, replace=body.replace)
        except AdapterError as exc:
            raise ServeError(409 if "already registered" in str(exc) else 400, str(exc), param="path")
        return {"id": body.name, "source": adapter.source, "bytes": adapter.nbytes}

    @app.delete("/admin/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> dict[str, Any]:
        _admin(request)
        try:
            store.remove(name)
        except UnknownAdapter:
            raise ServeError(404, f"adapter {name!r} is not registered", kind="not_found_error", param="name")
        except AdapterError as exc:
            raise ServeError(409, str(exc), param="name")
        return {"id": name, "deleted": True}

    app.include_router(openai)
    return app


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(request: GenerationRequest, cid: str, model: str, chat: bool) -> StreamingResponse:
    """OpenAI's streaming format: one ``data: {chunk}`` event per text piece, then ``data: [DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text is not None else {},
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": cid, "object": kind, "created": int(time.time()), "model": model,
                                      "choices": [choice]}) + "\n\n"

    async def events() -> AsyncIterator[str]:
        pieces = request.stream()
        if chat:
            yield chunk(None, None).replace('"delta": {}', '"delta": {"role": "assistant"}')
        while True:
            try:
                piece = await asyncio.to_thread(next, pieces, None)
            except Exception as exc:  # noqa: BLE001 - an engine error ends the stream with an error event
                yield "data: " + json.dumps({"error": {"message": str(exc), "type": "server_error"}}) + "\n\n"
                return
            if piece is None:
                break
            yield chunk(piece, None)
        result = request.result.result()
        yield chunk(None if chat else "", result.finish_reason)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
