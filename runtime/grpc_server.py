"""gRPC front end: `largemodel.v1.Generation/Generate` (server streaming) plus grpc.health.v1.

Stubs are generated from largemodel.proto with grpc_tools at first import into a cache
directory keyed by the proto's hash (under the temp dir, writable even on a read-only root
filesystem), so generated code is never committed and never stale.
"""

from __future__ import annotations

import hashlib
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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from largemodel.runtime.admission import build_request, encode_chat, encode_text
from largemodel.runtime.generation import AdmissionError, QueueFullError, UnavailableError

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
        try:
            gen = self._to_generation_request(request)
            stream = state.scheduler.submit(gen)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except UnavailableError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except AdmissionError as err:
            state.count_invalid()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
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

    def _to_generation_request(self, request: Any) -> Any:
        state = self._state
        if bool(request.prompt) == bool(request.messages):
            raise AdmissionError("set exactly one of prompt or messages", "prompt")
        if request.prompt:
            tokens = encode_text(state.tokenizer, request.prompt, state.max_model_len)
        else:
            roles = {"system", "developer", "user", "assistant", "tool"}
            for m in request.messages:
                if m.role not in roles:
                    raise AdmissionError(f"message role {m.role!r} is not one of {sorted(roles)}", "messages")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            tokens = encode_chat(state.tokenizer, messages, state.max_model_len)

        def opt(name: str) -> Any:
            return getattr(request, name) if request.HasField(name) else None

        temperature, top_p = opt("temperature"), opt("top_p")
        if temperature is not None and not 0 <= temperature <= 2:
            raise AdmissionError("temperature must be between 0 and 2", "temperature")
        if top_p is not None and not 0 < top_p <= 1:
            raise AdmissionError("top_p must be in (0, 1]", "top_p")
        if seed := opt("seed"):
            seed = min(seed, 2**63 - 1)
        return build_request(
            state.scheduler, state.sampling_params, state.defaults, tokens,
            max_tokens=request.max_tokens or None, temperature=temperature, top_p=top_p,
            top_k=opt("top_k"), seed=seed, stop=tuple(request.stop), ignore_eos=request.ignore_eos,
        )


async def start_grpc_server(state: Any, host: str, port: int) -> tuple[grpc.aio.Server, Any]:
    """Bind and start the gRPC server; returns it and its health servicer (SERVING)."""
    pb2, pb2_grpc = load_stubs()
    # gRPC sets SO_REUSEPORT by default: a second server on a taken port would "start" and steal calls.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
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
