"""Start one rank group as `largemodel rank` pods (one supervisor process per pipeline stage)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from largemodel import envcontract
from largemodel.runtime import local
from largemodel.runtime.local import NotReadyError, free_port, free_port_pair
from tests.support.rank_world import child_env


@dataclass
class Pods:
    """Running stage supervisors and where to reach them."""

    procs: list[subprocess.Popen[bytes]]
    http_url: str
    metrics_ports: list[int]
    logs: list[Path]

    def tail(self) -> str:
        """Every pod's log tail, for assertion messages."""
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:] for p in self.logs if p.exists())

    def rank_pids(self, stage: int) -> list[int]:
        """PIDs of the rank processes a stage's supervisor started, in local-rank order."""
        children = Path(f"/proc/{self.procs[stage].pid}/task/{self.procs[stage].pid}/children").read_text().split()
        return sorted(int(c) for c in children)

    def wait_exit(self, timeout_s: float) -> list[int | None]:
        """Exit codes once every pod has exited, or None for pods still running at the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        return [p.poll() for p in self.procs]


def group_env(model_dir: Path, tp: int, pp: int, **overrides: str) -> dict[str, str]:
    """The group-wide env contract as the builders write it, on 127.0.0.1 with free ports."""
    env = envcontract.RankGroupEnv(
        master_addr="127.0.0.1", master_port=free_port_pair(), tp=tp, pp=pp, group_index=0,
        model_uri=model_dir.resolve().as_uri(), model_dtype="float32", micro_batches=2, engine="native",
        http_port=free_port(), grpc_port=free_port(), metrics_port=9100, max_batch_size=4, max_queue=16,
        max_model_len=64, model_name="tiny",
    ).as_env()
    env.update({"BIND_HOST": "127.0.0.1", "DRAIN_GRACE_SECONDS": "5"})
    env.update(overrides)
    return env


@contextlib.contextmanager
def running_pods(env: dict[str, str], workdir: Path, ready_timeout_s: float = 90,
                 prefix: Sequence[Sequence[str]] | None = None, per_stage: Sequence[dict[str, str]] | None = None,
                 wait_ready: bool = True) -> Iterator[Pods]:
    """Start one supervisor per stage (optionally under a command prefix and extra env per stage)."""
    pp = int(env[envcontract.PP_SIZE])
    procs: list[subprocess.Popen[bytes]] = []
    metrics_ports = [free_port() for _ in range(pp)]
    logs = [workdir / f"pod{stage}.log" for stage in range(pp)]
    pods = Pods(procs, f"http://127.0.0.1:{env[envcontract.HTTP_PORT]}", metrics_ports, logs)
    try:
        for stage in range(pp):
            stage_env = child_env({**env, envcontract.NODE_RANK: str(stage), envcontract.LWS_WORKER_INDEX: str(stage),
                                   envcontract.METRICS_PORT: str(metrics_ports[stage]), "TMPDIR": str(workdir),
                                   **(per_stage[stage] if per_stage else {})})
            cmd = [*(prefix[stage] if prefix else []), sys.executable, "-m", "largemodel.runtime.launch"]
            with logs[stage].open("wb") as out:
                procs.append(subprocess.Popen(cmd, env=stage_env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        if wait_ready:
            try:
                local.wait_ready(f"{pods.http_url}/readyz", procs, ready_timeout_s)  # the flag shadows the name
            except NotReadyError as err:
                raise AssertionError(f"{err}\n{pods.tail()}") from None
        yield pods
    finally:
        for p in procs:
            # Each pod leads its own session with its ranks in it: kill the lot.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
