"""gRPC front end: `largemodel.v1.Generation/Generate` (server streaming) plus grpc.health.v1.

A GenerateRequest is turned into the same pydantic request model the HTTP API validates
(CompletionRequest or ChatCompletionRequest), so both front ends accept and refuse exactly the
same requests; tokenizing runs off the event loop, and messages are capped at the HTTP body
size. With an API key set, calls need the metadata `authorization: Bearer <key>`.

Stubs are generated from largemodel.proto with grpc_tools at first import into a cache
directory keyed by the proto's hash (under the temp dir, writable even on a read-only root
filesystem), so generated code is never committed and never stale.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pydantic
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from largemodel.runtime import protocol as p
from largemodel.runtime.admission import chat_request, completion_request
from largemodel.runtime.generation import AdmissionError, GenerationRequest, QueueFullError, UnavailableError

log = logging.getLogger(__name__)

PROTO_PATH = Path(__file__).with_name("largemodel.proto")
SERVICE_NAME = "largemodel.v1.Generation"


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """(largemodel_pb2, largemodel_pb2_grpc), generated from the .proto on first use."""
    digest = hashlib.sha256(PROTO_PATH.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"largemodel-grpc-{digest}"
    if not (out / "largemodel_pb2_grpc.py").is_file():
        _generate_stubs(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("largemodel_pb2"), importlib.import_module("largemodel_pb2_grpc")


def _generate_stubs(out: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).with_name("_proto")
    staging = Path(tempfile.mkdtemp(prefix="largemodel-grpc-", dir=out.parent))
    argv = [
        "grpc_tools.protoc", f"-I{PROTO_PATH.parent}", f"-I{include}",
        f"--python_out={staging}", f"--grpc_python_out={staging}", str(PROTO_PATH),
    ]
    if protoc.main(argv) != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"grpc_tools.protoc failed to compile {PROTO_PATH}")
    try:
        # Rename is atomic: concurrent processes either win or find the finished directory.
        os.rename(staging, out)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("grpc.stubs generated dir=%s", out)


class GenerationServicer:
    """Implements largemodel.v1.Generation on top of the scheduler."""

    def __init__(self, state: Any, pb2: ModuleType) -> None:
        self._state = state
        self._pb2 = pb2

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        """Stream one message per token chunk; the last carries finish_reason and usage."""
        state = self._state
        if state.api_key and not _authorized(context, state.api_key):
            state.count_invalid()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer <key>'")
        try:
            gen = await self._to_generation_request(request)
            stream = state.scheduler.submit(gen)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except UnavailableError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except AdmissionError as err:
            state.count_invalid()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - a bug, not bad input: answered and counted like HTTP's 500
            state.count_error()
            log.error("grpc.request_failed error=%r", err, exc_info=err)
            await context.abort(grpc.StatusCode.INTERNAL, "the server failed to handle this request")
        try:
            async for chunk in stream:
                if chunk.finish_reason in ("abort", "error"):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "generation was aborted: the server is stopping")
                message = self._pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
                if chunk.finish_reason is not None:
                    message.finish_reason = chunk.finish_reason
                    message.usage.prompt_tokens = chunk.prompt_tokens
                    message.usage.completion_tokens = chunk.completion_tokens
                    message.usage.total_tokens = chunk.prompt_tokens + chunk.completion_tokens
                yield message
        finally:
            if not stream.finished:
                stream.cancel()

    async def _to_generation_request(self, request: Any) -> GenerationRequest:
        body = to_api_request(request)
        if isinstance(body, p.CompletionRequest):
            # gRPC's max_tokens 0 (unset) means "up to the context limit", not the completions default of 16.
            return await completion_request(self._state, body, default_max_tokens=None)
        return await chat_request(self._state, body)


def to_api_request(request: Any) -> p.CompletionRequest | p.ChatCompletionRequest:
    """The HTTP API's request model for a GenerateRequest; AdmissionError with HTTP's message when invalid."""
    if bool(request.prompt) == bool(request.messages):
        raise AdmissionError("set exactly one of prompt or messages", "prompt")
    fields: dict[str, Any] = {"ignore_eos": request.ignore_eos}
    if request.max_tokens:
        fields["max_tokens"] = request.max_tokens
    if request.stop:
        fields["stop"] = list(request.stop)
    for name in ("temperature", "top_p", "top_k", "seed"):
        if request.HasField(name):
            fields[name] = getattr(request, name)
    try:
        if request.prompt:
            return p.CompletionRequest.model_validate({"prompt": request.prompt, **fields})
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return p.ChatCompletionRequest.model_validate({"messages": messages, **fields})
    except pydantic.ValidationError as err:
        message, param = p.validation_message(err.errors())
        raise AdmissionError(message, param) from None


def _authorized(context: grpc.aio.ServicerContext, api_key: str) -> bool:
    given = dict(context.invocation_metadata() or ()).get("authorization", "")
    given_bytes = given.encode("latin-1", "replace") if isinstance(given, str) else bytes(given)
    return hmac.compare_digest(given_bytes, f"Bearer {api_key}".encode())


async def start_grpc_server(state: Any, host: str, port: int,
                            max_message_bytes: int = 4 * 1024 * 1024) -> tuple[grpc.aio.Server, Any]:
    """Bind and start the gRPC server; returns it and its health servicer (SERVING)."""
    pb2, pb2_grpc = load_stubs()
    server = grpc.aio.server(options=[
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would "start" and steal calls.
        ("grpc.so_reuseport", 0),
        # The same cap as the HTTP body, so neither front end takes more than the other.
        ("grpc.max_receive_message_length", max_message_bytes),
        # A connection with no call in progress is closed after a minute, as idle HTTP ones are sooner.
        ("grpc.max_connection_idle_ms", 60_000),
    ])
    pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(state, pb2), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc.listening address=%s", address)
    return server, health_servicer


async def set_not_serving(health_servicer: Any) -> None:
    """Tell health checkers to stop routing here (draining)."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
