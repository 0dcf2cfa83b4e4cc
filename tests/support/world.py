"""A real rank group for the serving tests: `largemodel run` over a tiny checkpoint on 127.0.0.1.

`largemodel run` starts one `largemodel rank` process per pipeline stage with the operator's env
contract; tests talk to it over HTTP and gRPC like any client would, and kill every process it
started at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from largemodel.runtime.local import NotReadyError, free_port, wait_ready

READY_TIMEOUT_S = 120


@dataclass
class RunningServer:
    """One `largemodel run` process and the addresses it serves."""

    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    model: str
    log_path: Path

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        """Everything the run and its ranks printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM `largemodel run` (it drains and stops its ranks); kill what is left after the timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            kill_process_tree(self.proc)


def kill_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc` and every process of the rank groups it started (their own sessions)."""
    pids = descendants(proc.pid) + [proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out.extend(descendants(child))
        out.append(child)
    return out


def write_largemodel(path: Path, name: str, model_dir: Path, *, pp: int = 2, micro_batches: int = 2,
                     max_batch: int = 8, max_queue: int = 24, max_len: int = 128) -> Path:
    """A LargeModel file for a local run of `model_dir`."""
    doc = {
        "apiVersion": "serving.largemodel.io/v1alpha1",
        "kind": "LargeModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": model_dir.resolve().as_uri(), "dtype": "float32"},
            "parallelism": {"tensor": 1, "pipeline": pp, "microBatches": micro_batches},
            "gpu": {"perNode": 4, "memoryGiB": 8},
            "serving": {"maxBatchSize": max_batch, "maxQueue": max_queue, "maxModelLen": max_len},
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def start_run(lm_file: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `largemodel run -f lm_file` on free ports and wait until /readyz says ready.

    A free port can be taken by another process between our probe and the server's bind (the suite
    runs many groups): such a start ends with `server.bind_failed`, and is retried once on new ports.
    """
    try:
        return _start_run_once(lm_file, log_path, *extra, env=env)
    except AssertionError as err:
        if "server.bind_failed" not in str(err):
            raise
        return _start_run_once(lm_file, log_path, *extra, env=env)


def _start_run_once(lm_file: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> RunningServer:
    http_port, grpc_port = free_port(), free_port()
    name = yaml.safe_load(lm_file.read_text())["metadata"]["name"]
    full_env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "largemodel.operator.cli", "run", "-f", str(lm_file),
           "--port", str(http_port), "--grpc-port", str(grpc_port), *extra]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(proc, http_port, grpc_port, name, log_path)
    try:
        wait_ready(f"{server.base_url}/readyz", [proc], READY_TIMEOUT_S)
    except NotReadyError as err:
        if proc.poll() is None:
            kill_process_tree(proc)
        raise AssertionError(f"largemodel run: {err}:\n{server.log_text()[-4000:]}") from None
    return server


def post_json(url: str, body: dict[str, object], timeout: float = 60) -> tuple[int, dict[str, object]]:
    """POST a JSON body; (status, parsed JSON body) for success and error answers alike."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
