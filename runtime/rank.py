"""One rank process: join the group, load the shard, then serve (global rank 0) or work.

Local rank 0 of every pod also serves the pod's /metrics (all local ranks merged through
prometheus_client's multiprocess directory), /healthz and /readyz on METRICS_PORT. /readyz is
the pod's readiness probe (one pod template serves every stage, so the probe cannot differ by
stage): a stage is ready once every rank of the group has loaded its shard and joined; stage 0
also needs its HTTP and gRPC servers up and not draining.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from largemodel import envcontract
from largemodel.envcontract import RankEnv
from largemodel.runtime.watchdog import hung_reasons

if TYPE_CHECKING:
    from largemodel.runtime.engine import Engine

log = logging.getLogger(__name__)

EXIT_FATAL = 4
POD_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # per pod, shared by its ranks: metrics and the markers below
LOADED_MARKER = "loaded-rank"  # a rank whose shard is in memory leaves loaded-rank<RANK> there


class PodReadiness:
    """What this pod's /readyz answers; filled in as the rank joins and (on stage 0) starts serving."""

    def __init__(self, needs_server: bool) -> None:
        self.joined = threading.Event()
        self.needs_server = needs_server
        self.serving: Callable[[], bool] | None = None

    def publish_serving(self, check: Callable[[], bool]) -> None:
        """The server's own readiness check (engine up, listening, not draining)."""
        self.serving = check

    def ready(self) -> tuple[bool, str]:
        """(ready, why) for the probe."""
        if not self.joined.is_set():
            return False, "loading: not every rank of the group has loaded and joined"
        if self.needs_server and (self.serving is None or not self.serving()):
            return False, "group joined; server not listening yet, or draining"
        return True, "ready"


def pod_loaded(pod_dir: str | None, nproc: int) -> tuple[bool, str]:
    """(every local rank loaded, why) from the LOADED_MARKER files the ranks leave in the pod's directory."""
    loaded = len(list(Path(pod_dir).glob(LOADED_MARKER + "*"))) if pod_dir else 0
    if loaded >= nproc:
        return True, "loaded"
    return False, f"loading: {loaded}/{nproc} local ranks have their shard in memory"


def serve_pod_metrics(port: int, host: str, readiness: PodReadiness | None = None,
                      nproc: int = 1) -> ThreadingHTTPServer:
    """GET /metrics (every local rank, merged), /healthz, /startedz and /readyz, in a daemon thread."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif path == "/healthz":
                # A rank whose collective watchdog fired fails liveness (issue 17).
                hung = hung_reasons(os.environ.get(POD_DIR_ENV))
                body, ctype, code = ("\n".join(hung) + "\n").encode() if hung else b"ok\n", "text/plain", (
                    503 if hung else 200)
            elif path == "/startedz":
                # The startupProbe: every local rank has its shard in memory (issue 17).
                ok, why = pod_loaded(os.environ.get(POD_DIR_ENV), nproc)
                body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
            elif path == "/readyz":
                ok, why = readiness.ready() if readiness is not None else (False, "no readiness source")
                body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
            return

    from largemodel.runtime.httpguard import GuardedHTTPServer

    # Timeouts and a connection cap: a scanner or a slow client must not pin handler threads.
    server = GuardedHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="pod-metrics", daemon=True).start()
    log.info("event=metrics_listening host=%s port=%d", host, port)
    return server


def _fatal(exc: BaseException) -> None:
    # A collective failed: a peer is gone and the group can never recover. Exit at once so the
    # pod supervisor and the operator restart the group instead of serving errors forever.
    log.error("event=group_broken error=%r action=exit code=%d", exc, EXIT_FATAL)
    logging.shutdown()
    os._exit(EXIT_FATAL)


def run_rank(local_rank: int, environ: dict[str, str]) -> int:
    """Everything one rank does, from joining the group to leaving it; returns the exit code."""
    import torch.distributed as dist

    from largemodel import metrics
    from largemodel.modelfacts import is_gguf_uri
    from largemodel.modeluri import resolve_model_dir
    from largemodel.runtime.parallel import init_distributed
    from largemodel.runtime.watchdog import COLLECTIVE_TIMEOUT_ENV, Watchdog

    env = RankEnv.from_environ(environ)
    rank = env.global_rank(local_rank)
    readiness = PodReadiness(needs_server=env.node_rank == 0)
    if local_rank == 0:
        serve_pod_metrics(env.metrics_port, environ.get("BIND_HOST", "0.0.0.0"), readiness, env.tp)
    max_batch, max_len = env.max_batch_size, env.max_model_len
    try:
        model_dir = resolve_model_dir(env.model_uri)
        if is_gguf_uri(env.model_uri):  # quantization=gguf: the file's config and tokenizer, and the file
            from largemodel.runtime.modelstore import gguf_model_dir

            model_dir = gguf_model_dir(model_dir)
        check_planned_split(model_dir, env)
        ctx = init_distributed(rank, env.world_size, env.tp, env.pp, env.master_addr, env.master_port,
                               bind_host=envcontract.rank_bind_host(environ),
                               secret=envcontract.group_secret(environ) or b"")
        metrics.RANK_INFO.labels(rank=str(rank), tp_rank=str(ctx.tp_rank), pp_rank=str(ctx.pp_rank), tp=str(env.tp),
                                 pp=str(env.pp), group=str(env.group_index), backend=ctx.backend,
                                 engine=env.engine).set(1)
        timeout_s = float(environ.get(COLLECTIVE_TIMEOUT_ENV) or 0)
        if timeout_s > 0:
            ctx.watchdog = Watchdog(rank, timeout_s, marker_dir=environ.get(POD_DIR_ENV)).start()
        began = time.perf_counter()

        def on_loaded() -> None:
            metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - began)
            if environ.get(POD_DIR_ENV):
                Path(environ[POD_DIR_ENV], f"{LOADED_MARKER}{rank}").touch()
            # Every rank calls this right after its shard is in memory, so passing the barrier
            # means the whole group has loaded and joined: the pod may report ready.
            dist.barrier()
            readiness.joined.set()
            log.info("event=group_joined rank=%d load_seconds=%.2f", rank, time.perf_counter() - began)

        if env.engine == "deepspeed":
            from largemodel.runtime.deepspeed_engine import start_deepspeed

            engine = start_deepspeed(model_dir, ctx, env, max_batch, max_len, on_loaded, _fatal)
        else:
            engine = start_native(model_dir, ctx, env, max_batch, max_len, on_loaded)
        if engine is None:
            return 0
        from largemodel.runtime.server import run_server

        code = run_server(engine, model_dir, environ, readiness.publish_serving)
        engine.shutdown()
        return code
    except Exception as exc:
        log.exception("event=rank_failed rank=%d error=%r", rank, exc)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_planned_split(model_dir: Path, env: RankEnv) -> None:
    """EnvContractError unless this runtime splits the layers exactly as the plan did (LAYERS_PER_STAGE)."""
    from largemodel.modelfacts import load_config
    from largemodel.partition import split_layers

    config = load_config(model_dir)
    env.check_layer_split(split_layers(config.num_hidden_layers, env.pp, config.head_layers))


def start_native(model_dir: Path, ctx: object, env: RankEnv, max_batch: int, max_len: int,
                 on_loaded: Callable[[], None]) -> Engine | None:
    """Load this rank's shard; global rank 0 returns the Engine, every other rank works until SHUTDOWN."""
    from largemodel.runtime.engine import Engine, worker_loop
    from largemodel.runtime.omp import on_own_thread
    from largemodel.runtime.parallel import ParallelContext
    from largemodel.runtime.weights import build_stage, parse_dtype

    assert isinstance(ctx, ParallelContext)
    # On a thread that ends: its OpenMP team must not outlive the load next to the engine thread's (runtime/omp.py).
    model, _seconds = on_own_thread(lambda: build_stage(
        model_dir, ctx, parse_dtype(env.model_dtype), ctx.device, max_batch, max_len,
        num_blocks=env.kv_cache_blocks, quantization=env.model_quantization), "load-shard")
    on_loaded()
    if ctx.rank != 0:
        worker_loop(model, ctx)
        return None
    return Engine(model, ctx, micro_batches=env.micro_batches, on_fatal=_fatal, prefix_cache=env.prefix_cache)
