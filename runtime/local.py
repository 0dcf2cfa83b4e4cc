"""`largemodel run -f FILE`: run a LargeModel on this machine, every pipeline stage as a local "pod".

It plans the file as the operator would, resolves the model (building SmolLM2 offline the first
time), starts one `largemodel rank` process per stage with exactly the env the operator injects
(MASTER_ADDR=127.0.0.1 and free ports instead of cluster DNS), waits for /readyz and serves on
127.0.0.1. With --prompt it asks one question through the real HTTP API, prints the streamed
answer and shuts the ranks down; without it, it serves until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

from largemodel import envcontract
from largemodel.runtime.launch import RUN_PID_ENV
from largemodel.runtime.server import BIND_HOST_ENV, DRAIN_GRACE_ENV

log = logging.getLogger("largemodel.run")

EXIT_USAGE = 2
LOCALHOST = "127.0.0.1"


class _Stop(Exception):
    """SIGTERM arrived: leave the serve loop and clean up, like Ctrl-C."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largemodel run", description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", required=True, help="LargeModel YAML file")
    parser.add_argument("--prompt", help="ask this once (chat completion), print the answer and exit")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit for --prompt")
    parser.add_argument("--port", type=int, help="HTTP port on 127.0.0.1 (default spec.serving.httpPort; 0 = any)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default spec.serving.grpcPort; 0 = any)")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for every rank to join")
    parser.add_argument("--grace", type=float, default=30, help="seconds in-flight requests get on shutdown")
    return parser


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port p with p+1 free too: the rendezvous port and, right after it, the group's liveness port."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and not _port_busy(port + 1):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((LOCALHOST, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("found no two adjacent free ports on 127.0.0.1")


def main(argv: list[str]) -> int:
    """Entry point of `largemodel run`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.max_tokens < 1:
        print("largemodel run: error: --max-tokens must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        lm, plan, model_dir = _prepare(args.file)
    except ValueError as err:  # InputError, PlanError, ModelStoreError are all ValueErrors or wrapped
        print(f"largemodel run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    serving = lm.spec.serving
    http_port = _pick_port(args.port, serving.http_port)
    grpc_port = _pick_port(args.grpc_port, serving.grpc_port)
    for flag, port in (("--port", http_port), ("--grpc-port", grpc_port)):
        if _port_busy(port):
            print(f"largemodel run: error: port {port} on {LOCALHOST} is in use; pass {flag} N (0 picks a free one)",
                  file=sys.stderr)
            return EXIT_USAGE
    # The same mapping of the LargeModel onto the env contract as the operator's pods get (builders.py).
    from largemodel.operator.builders import rank_group_env

    group = rank_group_env(lm, plan, 0, master_addr=LOCALHOST, master_port=free_port_pair(),
                           model_uri=model_dir.resolve().as_uri(), http_port=http_port, grpc_port=grpc_port)
    log.info("run.plan name=%s tp=%d pp=%d micro_batches=%d layers_per_stage=%s model_dir=%s",
             lm.metadata.name, plan.tp, plan.pp, plan.micro_batches, list(plan.layers_per_stage), model_dir)
    signal.signal(signal.SIGTERM, _raise_stop)
    # Ctrl-C stops the run even when it was started with SIGINT ignored (a non-interactive shell's
    # background job passes that on, and Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        # The stages of this group authenticate each other with it (rank ports bind loopback anyway).
        secret = secrets.token_hex(32)
        nodes = [_start_node(group, stage, args.grace, secret) for stage in range(plan.pp)]
        base = f"http://{LOCALHOST}:{http_port}"
        wait_ready(f"{base}/readyz", nodes, args.ready_timeout)
        log.info("run.ready http=%s/v1 grpc=%s:%d model=%s", base, LOCALHOST, grpc_port, lm.metadata.name)
        if args.prompt is not None:
            _ask(base, lm.metadata.name, args.prompt, args.max_tokens)
            return _stop_nodes(nodes, args.grace)
        print(f"serving {lm.metadata.name} on {base}/v1 (gRPC {LOCALHOST}:{grpc_port}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while all(node.poll() is None for node in nodes):
            time.sleep(0.5)
        log.error("run.rank_exited codes=%s", [node.poll() for node in nodes])
        _stop_nodes(nodes, args.grace)
        return 1
    except (KeyboardInterrupt, _Stop):
        log.info("run.interrupted stopping ranks")
        _stop_nodes(nodes, args.grace)
        return 0
    except RuntimeError as err:
        print(f"largemodel run: error: {err}", file=sys.stderr)
        _stop_nodes(nodes, args.grace)
        return 1
    finally:
        _kill_all(nodes)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def _pick_port(requested: int | None, spec_port: int) -> int:
    if requested is None:
        return spec_port
    return requested or free_port()


def _prepare(path: str) -> tuple[Any, Any, Path]:
    """Load, plan and resolve the model; any user error is a ValueError with a one-line message."""
    from largemodel.modelfacts import is_gguf_uri
    from largemodel.operator.manifest import InputError, load_largemodel
    from largemodel.operator.modelconfig import ModelConfigError, inspect_model
    from largemodel.operator.planner import PlanError, plan_parallelism
    from largemodel.runtime.modelstore import ModelStoreError, local_gguf_file, local_model_dir

    lm = load_largemodel(path)
    spec = lm.spec
    try:
        arch = spec.model.architecture
        if arch is None and urlparse(spec.model.uri).scheme != "file":
            # Planning needs the architecture: read it from the (built or cached) model directory.
            arch = inspect_model(local_model_dir(spec.model.uri))
        if is_gguf_uri(spec.model.uri) and spec.model.quantization == "gguf":
            # Plan from the local file's own header (its tensor bytes and block), as for a file:// source.
            local = local_gguf_file(spec.model.uri).resolve().as_uri()
            plan = plan_parallelism(spec.model_copy(update={"model": spec.model.model_copy(update={"uri": local})}),
                                    arch)
        else:
            plan = plan_parallelism(spec, arch)
        model_dir = local_model_dir(spec.model.uri)
    except (PlanError, ModelStoreError, ModelConfigError) as err:
        raise InputError(f"{path}: {err}") from None
    for warning in plan.warnings:
        log.warning("run.plan_warning %s", warning)
    return lm, plan, model_dir


def _start_node(group: envcontract.RankGroupEnv, stage: int, grace_s: float,
                secret: str = "") -> subprocess.Popen[bytes]:
    """Start stage `stage` as its own process group, as one pod would run."""
    env = dict(os.environ)
    env.update(group.node_env(stage))
    # Pods each own their IP; on one machine every stage needs its own metrics port (stage 0's
    # metrics are on the HTTP port's /metrics too).
    env[envcontract.METRICS_PORT] = str(free_port())
    env[BIND_HOST_ENV] = LOCALHOST
    if secret:
        env[envcontract.GROUP_SECRET] = secret
    env[DRAIN_GRACE_ENV] = str(grace_s)
    env[RUN_PID_ENV] = str(os.getpid())  # a stage stops its ranks if this process dies without stopping it
    env["PYTHONSAFEPATH"] = "1"
    # The cores are split over the TP ranks of a stage, which compute at the same time; pipeline stages
    # each get that whole share: at batch 1 only one stage computes at a time, and the waiting one's
    # threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning on the cores it needs. Measured on the
    # 2-core host (examples/smollm2-local.yaml, pp=2): batch-1 decode 12.3-12.5 -> 16.5-20.3 tok/s
    # (pipeline 1: 19-21), 16 streams 75-79 -> 85-87 tok/s (docs/PERFORMANCE.md, peers.py).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // group.tp)))
    if group.pp > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "largemodel.operator.cli", "rank"]
    log.info("run.start_node stage=%d metrics_port=%s", stage, env[envcontract.METRICS_PORT])
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((LOCALHOST, port)) == 0


class NotReadyError(RuntimeError):
    """A readiness endpoint never answered 200: a watched process exited first, or time ran out."""


def wait_ready(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float, poll_s: float = 0.3) -> None:
    """Poll `url` until it answers 200; NotReadyError as soon as one of `procs` exits, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_log = time.monotonic()
    while time.monotonic() < deadline:
        for index, proc in enumerate(procs):  # for a rank group, index = stage
            if proc.poll() is not None:
                raise NotReadyError(f"process {index} exited with code {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("run.waiting_ready url=%s", url)
        time.sleep(poll_s)
    raise NotReadyError(f"{url} was not ready within {timeout_s:.0f}s")


def _ask(base: str, model: str, prompt: str, max_tokens: int) -> None:
    """Send one chat completion through the HTTP API and print the streamed answer."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    usage: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(f"generation failed: {event['error']['message']}")
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    sys.stdout.write(choice.get("delta", {}).get("content", "") or "")
                    sys.stdout.flush()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"HTTP {err.code}: {err.read().decode(errors='replace')}") from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.info("run.answered prompt_tokens=%s completion_tokens=%s", usage.get("prompt_tokens"),
             usage.get("completion_tokens"))


def _stop_nodes(nodes: list[subprocess.Popen[bytes]], grace_s: float) -> int:
    """SIGTERM stage 0 (it drains, then shuts every stage down through the pipeline) and wait.

    The other stages leave on their own once stage 0 sent SHUTDOWN; any that do not (stage 0
    died first) get SIGTERM after a short wait, and _kill_all handles what still hangs.
    """
    if not nodes:
        return 0
    if nodes[0].poll() is None:
        nodes[0].send_signal(signal.SIGTERM)
    _wait_exit(nodes[:1], grace_s + 30)
    if not _wait_exit(nodes[1:], 10):
        for node in nodes[1:]:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        _wait_exit(nodes[1:], 15)
    codes = [n.poll() for n in nodes]
    log.info("run.stopped exit_codes=%s", codes)
    return 0 if all(c == 0 for c in codes) else 1


def _wait_exit(nodes: list[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(n.poll() is None for n in nodes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill_all(nodes: list[subprocess.Popen[bytes]]) -> None:
    """Last resort: no rank process outlives `largemodel run`."""
    for node in nodes:
        if node.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(node.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    node.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The stage's own children (its local ranks) share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGKILL)
