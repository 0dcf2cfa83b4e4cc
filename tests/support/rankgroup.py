"""One rank group on this machine, started the way the operator's pods start it.

Each pipeline stage is one `largemodel rank` process (a "pod") with exactly the env contract the
builders inject (`RankGroupEnv.node_env`), its own metrics port and 127.0.0.1 as MASTER_ADDR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from largemodel import envcontract
from largemodel.runtime.local import NotReadyError, free_port, free_port_pair, wait_ready
from largemodel.runtime.parallel import PG_TIMEOUT_ENV
from largemodel.runtime.server import BIND_HOST_ENV, DRAIN_GRACE_ENV

log = logging.getLogger(__name__)

# Idle heartbeats (a NOOP plan every quarter of the process-group timeout) add broadcasts and
# point-to-point messages: a long timeout keeps them out of a test's counting windows.
PG_TIMEOUT_S = 1200


@dataclass(frozen=True)
class RankGroup:
    """A running group: where to send requests and where each stage serves /metrics."""

    name: str
    tp: int
    pp: int
    http_url: str
    metrics_ports: list[int]
    logs: list[Path]

    def pod(self, stage: int) -> str:
        """The pod name the operator would give stage `stage` of group 0."""
        return f"{self.name}-g0-{stage}"

    def scrape(self, stage: int) -> str:
        """The /metrics body of one stage's metrics port."""
        response = httpx.get(f"http://127.0.0.1:{self.metrics_ports[stage]}/metrics", timeout=10.0)
        response.raise_for_status()
        return response.text

    def tail_logs(self) -> str:
        """The end of every stage's log, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists())


def _wait_ready(group: RankGroup, procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    try:
        wait_ready(f"{group.http_url}/readyz", procs, timeout_s, poll_s=0.5)
    except NotReadyError as err:
        raise RuntimeError(f"{err}\n{group.tail_logs()}") from None


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # SIGTERM to stage 0 drains and shuts the whole group down; anything left gets SIGKILL.
    if procs and procs[0].poll() is None:
        procs[0].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for proc in procs:
        # Each stage leads its own process group, which holds its local ranks.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_rank_group(
    model_dir: Path, workdir: Path, *, name: str = "tiny", tp: int = 2, pp: int = 2, micro_batches: int = 2,
    max_batch_size: int = 4, max_queue: int = 8, max_model_len: int = 256, ready_timeout_s: float = 150,
) -> Iterator[RankGroup]:
    """Start every stage of one group, wait until stage 0 is ready, stop them all on exit."""
    group_env = envcontract.RankGroupEnv(
        master_addr="127.0.0.1", master_port=free_port_pair(), tp=tp, pp=pp, group_index=0,
        model_uri=model_dir.resolve().as_uri(), model_dtype="float32", micro_batches=micro_batches,
        engine="native", http_port=free_port(), grpc_port=free_port(), metrics_port=envcontract.DEFAULT_METRICS_PORT,
        max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=max_model_len, model_name=name,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_ports = [free_port() for _ in range(pp)]
    logs = [workdir / f"stage{stage}.log" for stage in range(pp)]
    group = RankGroup(name, tp, pp, f"http://127.0.0.1:{group_env.http_port}", metrics_ports, logs)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for stage in range(pp):
            env = {**os.environ, **group_env.node_env(stage)}
            env.update({
                envcontract.METRICS_PORT: str(metrics_ports[stage]), BIND_HOST_ENV: "127.0.0.1",
                DRAIN_GRACE_ENV: "5", "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1",
                PG_TIMEOUT_ENV: str(PG_TIMEOUT_S), "TMPDIR": str(workdir),
            })
            with logs[stage].open("wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "largemodel.operator.cli", "rank"], env=env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        log.info("rank group starting name=%s tp=%d pp=%d metrics_ports=%s", name, tp, pp, metrics_ports)
        _wait_ready(group, procs, ready_timeout_s)
        yield group
    finally:
        _stop(procs)
