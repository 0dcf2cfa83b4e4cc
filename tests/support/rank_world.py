"""Start a local multi-process world for a test, bounded in time, and always clean it up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from largemodel.runtime.launch import stop_processes
from largemodel.runtime.local import free_port
from tests.support.paths import REPO

MAINS = REPO / "tests" / "runtime"  # the *_main.py scripts ranks run


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every child inherits: safe path, one thread, no network for the hub."""
    env = dict(os.environ)
    env.update({"PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def run_world(tp: int, pp: int, script: str, args: Sequence[str], timeout_s: float, log_dir: Path,
              extra_env: Mapping[str, str] | None = None) -> list[int]:
    """Run `script` as tp*pp ranks on 127.0.0.1; return their exit codes (raise on timeout)."""
    world, port = tp * pp, free_port()
    procs = []
    try:
        for rank in range(world):
            env = child_env({"RANK": str(rank), "WORLD_SIZE": str(world), "TP_SIZE": str(tp), "PP_SIZE": str(pp),
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(extra_env or {})})
            out = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen([sys.executable, str(MAINS / script), *args], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs):
                return [int(p.returncode) for p in procs]
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(1.0)  # give the others a moment to fail on their own, then stop them
                stop_processes(procs)
                return [int(p.returncode) for p in procs]
            time.sleep(0.05)
        raise TimeoutError(f"world tp={tp} pp={pp} did not finish in {timeout_s}s; logs in {log_dir}")
    finally:
        stop_processes(procs)


def logs(log_dir: Path) -> str:
    """Tail of every rank's log, for assertion messages."""
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(log_dir.glob("rank*.log")))
