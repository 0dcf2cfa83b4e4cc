"""Serving on global rank 0: OpenAI-compatible HTTP, gRPC, health, metrics and graceful drain.

`run_server` is what `largemodel rank` calls once the engine is up; it blocks until SIGTERM
(or SIGINT), then stops admitting (503, readiness false), lets admitted requests finish within
the drain grace period, stops both servers and shuts the engine (and so every rank) down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from largemodel import envcontract, metrics
from largemodel.runtime import kvmetrics
from largemodel.runtime.admission import SamplingDefaults, load_sampling_defaults
from largemodel.runtime.httpguard import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    BodyGuard,
    TimedH11Protocol,
)
from largemodel.runtime.scheduler import Scheduler

if TYPE_CHECKING:
    from largemodel.runtime.engine import Engine

log = logging.getLogger(__name__)

# Serving-only settings, not part of the operator's env contract.
DRAIN_GRACE_ENV = envcontract.DRAIN_GRACE_SECONDS  # how long SIGTERM waits for admitted requests
BIND_HOST_ENV = "BIND_HOST"  # 0.0.0.0 in pods; `largemodel run` binds 127.0.0.1
DEFAULT_DRAIN_GRACE_S = float(envcontract.DEFAULT_DRAIN_SECONDS)
API_DOCS_ENV = "LARGEMODEL_API_DOCS"  # "1": serve /docs, /redoc and /openapi.json (off by default)
MAX_BODY_ENV = "LARGEMODEL_MAX_BODY_BYTES"  # HTTP body and gRPC message size cap
API_KEY_FILE_ENV = envcontract.API_KEY_FILE  # a file holding the bearer token clients must send (off when unset)
HEADER_TIMEOUT_ENV = "LARGEMODEL_HTTP_HEADER_TIMEOUT_S"  # connect (or last response) to a complete request head
BODY_TIMEOUT_ENV = "LARGEMODEL_HTTP_BODY_TIMEOUT_S"  # request head to complete body


@dataclass
class ServingState:
    """What the HTTP and gRPC handlers share."""

    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    max_model_len: int
    vocab_size: int
    sampling_params: Any
    defaults: SamplingDefaults
    created: int
    stopping: bool = False
    listening: bool = False
    # Tokenizing and chat templating run here, off the event loop (admission.off_loop).
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize"))
    tokenizing: int = 0
    max_tokenizing: int = 256
    api_key: str | None = None

    @property
    def ready(self) -> bool:
        """Serving traffic: the engine exists (so every rank joined), HTTP and gRPC listen, not failed or draining."""
        return self.listening and self.scheduler.accepting and not self.stopping

    def count_invalid(self) -> None:
        """Count a request refused as bad input."""
        metrics.REQUESTS.labels(status=metrics.STATUS_INVALID).inc()

    def count_error(self) -> None:
        """Count a request that failed inside the server."""
        metrics.REQUESTS.labels(status=metrics.STATUS_ERROR).inc()


@dataclass(frozen=True)
class ServerSettings:
    """Ports, limits and names read from the environment."""

    host: str
    http_port: int
    grpc_port: int
    max_queue: int
    model_name: str
    drain_grace_s: float
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_docs: bool = False
    api_key: str | None = None
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], model_dir: Path) -> ServerSettings:
        """Parse the serving variables; a bad value is an EnvContractError naming it."""

        def number(name: str, default: float, minimum: float = 0) -> float:
            raw = environ.get(name, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise envcontract.EnvContractError(f"environment variable {name}={raw!r} is not a number") from None
            if value < minimum:
                raise envcontract.EnvContractError(f"environment variable {name}={raw} must be >= {minimum}")
            return value

        # What the operator wrote (ports, limits, name) is the env contract's to read; the rest is the server's.
        contract = envcontract.RankEnv.from_environ(environ)
        return cls(
            host=environ.get(BIND_HOST_ENV, "") or "0.0.0.0",
            http_port=contract.http_port,
            grpc_port=contract.grpc_port,
            max_queue=contract.max_queue,
            model_name=contract.model_name or model_dir.name,
            drain_grace_s=number(DRAIN_GRACE_ENV, DEFAULT_DRAIN_GRACE_S),
            max_body_bytes=int(number(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES, 1024)),
            api_docs=environ.get(API_DOCS_ENV, "").strip().lower() in ("1", "true", "yes"),
            api_key=_read_api_key(environ),
            header_timeout_s=number(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT_S, 0.1),
            body_timeout_s=number(BODY_TIMEOUT_ENV, BODY_TIMEOUT_S, 0.1),
        )


def _read_api_key(environ: Mapping[str, str]) -> str | None:
    """The bearer token of API_KEY_FILE (the mounted spec.serving.apiKeySecret); None when unset."""
    path = environ.get(API_KEY_FILE_ENV, "").strip()
    if not path:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise envcontract.EnvContractError(f"environment variable {API_KEY_FILE_ENV}: cannot read the API key "
                                           f"({err.strerror})") from None
    if not key:
        raise envcontract.EnvContractError(f"environment variable {API_KEY_FILE_ENV}: the API key file is empty")
    return key


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: run_server owns SIGTERM and drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def load_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def run_server(engine: Engine, model_dir: Path, environ: Mapping[str, str],
               publish_ready: Callable[[Callable[[], bool]], None] | None = None) -> int:
    """Serve HTTP and gRPC for `engine` until SIGTERM, drain, shut the engine down; return the exit code.

    `publish_ready` receives the readiness check, so the pod's metrics port can answer /readyz with
    exactly what the HTTP /readyz answers.
    """
    from largemodel.runtime.engine import SamplingParams

    settings = ServerSettings.from_environ(environ, Path(model_dir))
    # Two tokenizers: the engine thread decodes while the event loop encodes, and a Rust
    # tokenizer object must not be used from two threads at once.
    scheduler = Scheduler(engine, load_tokenizer(model_dir), settings.max_queue)
    kvmetrics.publish_counters()
    state = ServingState(
        scheduler=scheduler,
        tokenizer=load_tokenizer(model_dir),
        model_name=settings.model_name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        sampling_params=SamplingParams,
        defaults=load_sampling_defaults(Path(model_dir)),
        created=int(time.time()),
        max_tokenizing=max(64, settings.max_queue),
        api_key=settings.api_key,
    )
    if publish_ready is not None:
        publish_ready(lambda: state.ready)
    try:
        return asyncio.run(_serve(state, settings))
    finally:
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        scheduler.stop()
        log.info("server.engine_shutdown")
        engine.shutdown()


async def _serve(state: ServingState, settings: ServerSettings) -> int:
    from largemodel.runtime.grpc_server import set_not_serving, start_grpc_server
    from largemodel.runtime.http_api import create_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state.scheduler.on_failure = lambda exc: loop.call_soon_threadsafe(stop.set)
    state.scheduler.start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    try:
        # Bound here, before anything reports "listening": a taken port is a clear error, not a traceback.
        http_socket = _bind(settings.host, settings.http_port)
    except OSError as err:
        log.error("server.bind_failed kind=http address=%s:%d error=%s", settings.host, settings.http_port, err)
        return 1
    try:
        grpc_server, health_servicer = await start_grpc_server(state, settings.host, settings.grpc_port,
                                                               settings.max_body_bytes)
    except RuntimeError as err:
        log.error("server.bind_failed kind=grpc address=%s:%d error=%s", settings.host, settings.grpc_port, err)
        http_socket.close()
        return 1
    app = BodyGuard(create_app(state, docs=settings.api_docs), settings.max_body_bytes, settings.body_timeout_s,
                    on_refused=lambda status: state.count_invalid())
    protocol = type("HTTPProtocol", (TimedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    config = uvicorn.Config(
        app, lifespan="off", access_log=False, log_level="warning",
        timeout_graceful_shutdown=5, log_config=None,
        # Bounded reads: idle keep-alive, the request head (TimedH11Protocol) and the body (BodyGuard).
        http=protocol, timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=64 * 1024,
    )
    http = _Server(config)
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    state.listening = True
    log.info("server.listening http=%s:%d grpc=%s:%d model=%s pid=%d", settings.host, settings.http_port,
             settings.host, settings.grpc_port, state.model_name, os.getpid())

    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if http_task in done:
        log.error("server.http_stopped_unexpectedly error=%r", http_task.exception())
        stop_task.cancel()
        await grpc_server.stop(0)
        return 1

    in_flight = state.scheduler.in_flight
    log.info("server.draining in_flight=%d grace_s=%.0f", in_flight, settings.drain_grace_s)
    state.stopping = True
    state.scheduler.begin_drain()
    await set_not_serving(health_servicer)
    idle = await state.scheduler.wait_idle(settings.drain_grace_s)
    if not idle:
        log.warning("server.drain_timeout aborting=%d", state.scheduler.in_flight)
    # Aborted leftovers get their final chunk here, before the servers wait for their streams;
    # joining the engine thread off the loop keeps those chunks flowing meanwhile.
    await asyncio.to_thread(state.scheduler.stop)
    http.should_exit = True
    await asyncio.gather(http_task, grpc_server.stop(grace=5), return_exceptions=True)
    failed = state.scheduler.failure is not None
    log.info("server.stopped drained=%s engine_failed=%s", idle, failed)
    return 1 if failed else 0
