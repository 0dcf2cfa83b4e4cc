"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, probes, metrics.

Every error, validation errors, unknown routes and unexpected failures included, is an OpenAI
error body (`{"error": {"message", "type", "param", "code"}}`) and is counted in
largemodel_requests_total. The OpenAPI document, /docs and /redoc are served only when asked
for (`create_app(docs=True)`, env LARGEMODEL_API_DOCS=1). With an API key set, /v1/* needs
`Authorization: Bearer <key>`; probes and /metrics stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from largemodel.runtime import protocol as p
from largemodel.runtime.admission import chat_request, completion_request
from largemodel.runtime.generation import AdmissionError, Chunk, QueueFullError, RequestStream

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 429: "requests", 503: "service_unavailable"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": p.ErrorResponse, "description": why}
    for code, why in ((400, "Invalid request"), (404, "Unknown model"), (429, "Queue full; see Retry-After"),
                      (503, "Draining or engine down"))
}


# nginx's "client closed request": logged only, since nobody is left to read it.
_CLIENT_CLOSED = 499
# How often a server whose receive() does not block is asked whether the client left.
_DISCONNECT_POLL_S = 0.1


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI error body with `status`."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = p.ErrorResponse(error=p.ErrorDetail(message=message, type=kind, param=param, code=code))
    return _AsciiJSONResponse(body.model_dump(), status_code=status, headers=headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting bad input (a lone surrogate) still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _admission_error(state: Any, err: AdmissionError) -> JSONResponse:
    if isinstance(err, QueueFullError):
        return error_response(429, str(err), code="rate_limit_exceeded",
                              headers={"Retry-After": str(err.retry_after_s)})
    if err.status in (400, 404):
        state.count_invalid()
    return error_response(err.status, str(err), param=err.param, code=err.code)


def create_app(state: Any, docs: bool = False) -> FastAPI:
    """The FastAPI application over a ServingState; `docs` serves /docs, /redoc and /openapi.json."""
    app = FastAPI(title="largemodel", version="0.1.0",
                  description="OpenAI-compatible API of a largemodel rank group.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.count_invalid()
        message, param = p.validation_message(exc.errors())
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code >= 500:
            state.count_error()
        elif exc.status_code >= 400:
            state.count_invalid()
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: still an OpenAI error body, counted, and logged with its traceback.
        state.count_error()
        log.error("request.failed path=%s error=%r", request.url.path, exc, exc_info=exc)
        return error_response(500, "the server failed to handle this request", code="internal_error")

    api_key = getattr(state, "api_key", None)
    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authenticate(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "").encode("latin-1", "replace")
                if not hmac.compare_digest(given, expected):
                    state.count_invalid()
                    return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
            return await call_next(request)

    @app.get("/healthz", tags=["probes"], responses={503: _ERROR_RESPONSES[503]})
    async def healthz() -> JSONResponse:
        """Liveness: the process serves and its engine thread has not failed."""
        if state.scheduler.failure is not None:
            return error_response(503, f"engine failed: {state.scheduler.failure}")
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["probes"], responses={503: _ERROR_RESPONSES[503]})
    async def readyz() -> JSONResponse:
        """Readiness: every rank has loaded and joined and the server is not draining."""
        if not state.ready:
            return error_response(503, "not ready: draining or engine down")
        return JSONResponse({"status": "ready", "in_flight": state.scheduler.in_flight})

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of this process's metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

        registry: Any = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=p.ModelList, tags=["openai"])
    async def list_models() -> p.ModelList:
        """The one model this server serves."""
        return p.ModelList(data=[_card(state)])

    @app.get("/v1/models/{model_id:path}", response_model=p.ModelCard, tags=["openai"],
             responses={404: _ERROR_RESPONSES[404]})
    async def get_model(model_id: str) -> Any:
        """One model by id."""
        if model_id != state.model_name:
            return error_response(404, f"model {model_id!r} does not exist; this server serves "
                                       f"{state.model_name!r}", param="model", code="model_not_found")
        return _card(state)

    @app.post("/v1/completions", response_model=p.CompletionResponse, tags=["openai"],
              responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        """Complete a prompt; `stream: true` answers with server-sent events."""
        try:
            _check_model(state, body.model)
            stream = state.scheduler.submit(await completion_request(state, body))
        except AdmissionError as err:
            return _admission_error(state, err)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_completion_events(state, rid, stream, body.include_usage()), stream)
        done = await _finished(request, stream, rid)
        if isinstance(done, Response):
            return done
        text, last = done
        return JSONResponse(p.CompletionResponse(
            id=rid, created=int(time.time()), model=state.model_name,
            choices=[p.CompletionChoice(text=text, finish_reason=last.finish_reason)], usage=_usage(last),
        ).model_dump())

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, tags=["openai"],
              responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation rendered with the model's chat template; `stream: true` uses SSE."""
        try:
            _check_model(state, body.model)
            stream = state.scheduler.submit(await chat_request(state, body))
        except AdmissionError as err:
            return _admission_error(state, err)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_chat_events(state, rid, stream, body.include_usage()), stream)
        done = await _finished(request, stream, rid)
        if isinstance(done, Response):
            return done
        text, last = done
        return JSONResponse(p.ChatCompletionResponse(
            id=rid, created=int(time.time()), model=state.model_name,
            choices=[p.ChatChoice(message=p.AssistantMessage(content=text), finish_reason=last.finish_reason)],
            usage=_usage(last),
        ).model_dump())

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 responses: validation errors are answered 400 here."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        app.openapi_schema = doc
    return app.openapi_schema


def _card(state: Any) -> p.ModelCard:
    return p.ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)


class ModelNotFoundError(AdmissionError):
    """The request names a model this server does not serve (OpenAI answers 404)."""

    status = 404
    code = "model_not_found"


def _check_model(state: Any, model: str | None) -> None:
    if model not in (None, "", state.model_name):
        raise ModelNotFoundError(f"model {model!r} does not exist here; this server serves {state.model_name!r} "
                                 "(see /v1/models)", "model")


async def _collect(stream: RequestStream) -> tuple[str, Chunk]:
    pieces: list[str] = []
    last: Chunk | None = None
    try:
        async for chunk in stream:
            pieces.append(chunk.text)
            last = chunk
    finally:
        if not stream.finished:
            stream.cancel()
    assert last is not None  # a stream always ends with a chunk that has a finish_reason
    return "".join(pieces), last


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (the ASGI server sends `http.disconnect`)."""
    # The same wait Starlette's StreamingResponse uses: with the body already read, uvicorn's
    # receive() blocks until the connection is lost, so this costs no polling. A server that
    # answers receive() at once with empty body messages is polled instead of spun on.
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def _finished(request: Request, stream: RequestStream, rid: str) -> tuple[str, Chunk] | Response:
    """The whole generation, or the response to send instead (client gone: 499; aborted: 503)."""
    result = await _collect_while_connected(request, stream, rid)
    if result is None:
        return Response(status_code=_CLIENT_CLOSED)
    text, last = result
    if last.finish_reason not in ("stop", "length"):
        return error_response(503, "generation was aborted: the server is stopping")
    return text, last


async def _collect_while_connected(request: Request, stream: RequestStream, rid: str) -> tuple[str, Chunk] | None:
    """The whole answer of a non-streamed request, or None when its client left first (then it is cancelled)."""
    collect = asyncio.ensure_future(_collect(stream))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            # Mark it now rather than when the cancelled task next runs: the engine frees the
            # slot at its next step either way, this just makes that step the soonest one.
            stream.cancel()
            collect.cancel()
    if collect.done() and not collect.cancelled():
        return collect.result()
    log.info("request.client_disconnected id=%s action=cancel", rid)
    return None


def _usage(chunk: Chunk) -> p.Usage:
    return p.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                   total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def _sse(events: AsyncIterator[dict[str, Any]], stream: RequestStream) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # The client hung up (or we are done): free the batch slot at the next step.
            if not stream.finished:
                stream.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _aborted_event() -> dict[str, Any]:
    return {"error": {"message": "generation was aborted: the server is stopping", "type": "server_error",
                      "param": None, "code": "aborted"}}


async def _completion_events(state: Any, rid: str, stream: RequestStream, usage: bool) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    async for chunk in stream:
        if chunk.finish_reason in ("abort", "error"):
            yield _aborted_event()
            return
        if chunk.text or chunk.finish_reason:
            choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}
            yield {**base, "choices": [choice]}
        if chunk.finish_reason and usage:
            yield {**base, "choices": [], "usage": _usage(chunk).model_dump()}


async def _chat_events(state: Any, rid: str, stream: RequestStream, usage: bool) -> AsyncIterator[dict[str, Any]]:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "logprobs": None}]}
    async for chunk in stream:
        if chunk.finish_reason in ("abort", "error"):
            yield _aborted_event()
            return
        if chunk.text:
            yield {**base, "choices": [{"index": 0, "delta": {"content": chunk.text},
                                        "finish_reason": None, "logprobs": None}]}
        if chunk.finish_reason:
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": chunk.finish_reason,
                                        "logprobs": None}]}
            if usage:
                yield {**base, "choices": [], "usage": _usage(chunk).model_dump()}
