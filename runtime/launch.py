"""`largemodel rank`: the pod entrypoint. Starts this pod's local ranks from the env contract.

The pod's main process only supervises: it starts NPROC_PER_NODE rank processes, forwards
SIGTERM, and when any rank dies it kills the rest and exits non-zero, so the operator sees the
group fail instead of a hang. Across pods, stage pods hold a liveness link to the stage-0 pod
(`largemodel.runtime.liveness`), so a dead pod takes the whole group down within a second.
Each rank process joins torch.distributed, loads its shard and either builds the Engine and
serves (global rank 0) or runs the worker loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from largemodel import envcontract
from largemodel.envcontract import EnvContractError, RankEnv

if TYPE_CHECKING:
    from largemodel.runtime.liveness import LivenessLink

log = logging.getLogger("largemodel.runtime.launch")

EXIT_ENV_ERROR = 2
EXIT_RANK_FAILED = 3
SHUTDOWN_GRACE_S = 60.0  # how long clean exits of the other ranks may take once one rank has left
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RUN_PID_ENV = "LARGEMODEL_RUN_PID"  # set by `largemodel run` for its stage processes: their parent


def configure_logging() -> None:
    """key=value lines on stderr with time and rank, the same in every process."""
    rank = os.environ.get(envcontract.RANK, "-")
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format=f"%(asctime)s level=%(levelname)s rank={rank} logger=%(name)s %(message)s")


def child_environ(env: RankEnv, local_rank: int, metrics_dir: Path) -> dict[str, str]:
    """What a rank process inherits: the pod's env plus its ranks, safe path and thread count."""
    child = dict(os.environ)
    child[envcontract.LOCAL_RANK] = str(local_rank)
    child[envcontract.RANK] = str(env.global_rank(local_rank))
    child["PYTHONSAFEPATH"] = "1"  # operator/ shadows the stdlib module when cwd is the source tree
    # Ranks share the pod's cores; without this each would start one thread per core.
    child.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // env.nproc_per_node)))
    # torch's CPU allocator backs tensors >= 2 MiB with transparent huge pages: streaming the weights
    # through fewer TLB entries measured +5-10% decode bandwidth (docs/PERFORMANCE.md, "Engine").
    child.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    child[MULTIPROC_ENV] = str(metrics_dir)
    if envcontract.rank_bind_host(child).startswith("127.") and not child.get("GLOO_SOCKET_IFNAME"):
        # gloo's p2p listeners bind the address of this interface: on loopback, nothing else can reach them.
        child["GLOO_SOCKET_IFNAME"] = "lo"
    return child


def term_bound_s(environ: Mapping[str, str]) -> float:
    """How long a SIGTERMed pod waits for its ranks: stage 0's drain (DRAIN_GRACE_SECONDS), then SHUTDOWN_GRACE_S.

    Every stage waits that long, so stages > 0 keep serving while stage 0 drains its streams.
    """
    raw = environ.get(envcontract.DRAIN_GRACE_SECONDS, "")
    try:
        drain = max(0.0, float(raw)) if raw else float(envcontract.DEFAULT_DRAIN_SECONDS)
    except ValueError:  # the server refuses the value and exits; its own default bounds the wait here
        drain = float(envcontract.DEFAULT_DRAIN_SECONDS)
    return drain + SHUTDOWN_GRACE_S


def supervise(procs: list[subprocess.Popen[bytes]], env: RankEnv, link: LivenessLink | None) -> int:
    """Wait for the ranks; if one fails (or the group's liveness link breaks), kill the rest."""
    stopping: list[float] = []

    def on_term(signum: int, _frame: object) -> None:
        # Global rank 0 drains and sends SHUTDOWN through the pipeline; the workers then leave.
        log.info("event=signal signum=%d", signum)
        stopping.append(time.monotonic())
        if env.node_rank == 0 and procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    first_clean_exit: float | None = None
    term_bound = term_bound_s(os.environ)
    # `largemodel run` names itself: if it is killed (SIGKILL, OOM) this stage must not live on alone.
    run_pid = os.environ.get(RUN_PID_ENV, "")
    parent = int(run_pid) if run_pid.isdigit() else None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            local, code = failed[0]
            log.error("event=rank_failed local_rank=%d rank=%d exit_code=%s action=stop_pod", local,
                      env.global_rank(local), code)
            if link is not None:
                link.close(clean=False)
            stop_processes(procs)
            return EXIT_RANK_FAILED
        if all(c == 0 for c in codes):
            if link is not None:
                link.close(clean=True)
            log.info("event=pod_exit ranks=%d exit_code=0", len(procs))
            return 0
        if first_clean_exit is None and any(c == 0 for c in codes):
            first_clean_exit = time.monotonic()
        late = first_clean_exit is not None and time.monotonic() - first_clean_exit > SHUTDOWN_GRACE_S
        term_late = bool(stopping) and time.monotonic() - stopping[0] > term_bound
        broken = link.poll() if link is not None else None
        if parent is not None and os.getppid() != parent:
            broken = f"largemodel run (pid {parent}) is gone"
        if late or term_late or broken:
            log.error("event=pod_stop reason=%s", broken or "ranks did not exit after shutdown")
            if link is not None:
                link.close(clean=False)
            stop_processes(procs)
            return EXIT_RANK_FAILED
        time.sleep(0.05 if link is None else 0.0)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 3.0) -> None:
    """SIGTERM every live rank, then SIGKILL what is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def run_pod(environ: dict[str, str]) -> int:
    """The pod's supervisor: validate the contract, start the local ranks, watch them."""
    from largemodel.runtime.liveness import LivenessLink

    try:
        env = RankEnv.from_environ(environ)
        secret = envcontract.group_secret(environ)
    except EnvContractError as exc:
        print(f"largemodel rank: {exc}", file=sys.stderr)
        return EXIT_ENV_ERROR
    metrics_dir = Path(tempfile.gettempdir()) / f"largemodel-metrics-g{env.group_index}-n{env.node_rank}-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    log.info("event=pod_start node_rank=%d nnodes=%d tp=%d pp=%d engine=%s model_uri=%s metrics_dir=%s",
             env.node_rank, env.nnodes, env.tp, env.pp, env.engine, env.model_uri, metrics_dir)
    link = LivenessLink.open(env, secret, envcontract.rank_bind_host(environ)) if env.nnodes > 1 else None
    procs = [subprocess.Popen([sys.executable, "-m", "largemodel.runtime.launch", "--local-rank", str(i)],
                              env=child_environ(env, i, metrics_dir)) for i in range(env.nproc_per_node)]
    try:
        return supervise(procs, env, link)
    finally:
        stop_processes(procs)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `largemodel rank` (and of each rank process, with --local-rank)."""
    parser = argparse.ArgumentParser(prog="largemodel rank", description="Start this pod's ranks from the env contract.")
    parser.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging()
    if args.local_rank is None:
        return run_pod(dict(os.environ))
    from largemodel.runtime.rank import run_rank

    return run_rank(args.local_rank, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
