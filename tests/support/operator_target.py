"""The real `largemodel operator` process as a second scrape target, with something to report.

It runs against the operator team's mock API server (tests/operator: K8sMock + a test kubelet),
manages one LargeModel of two rank groups, one of which crash-loops until its restart budget is
spent: so /metrics carries reconcile times, group restarts and groups in states ready and failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from largemodel.runtime.local import free_port
from tests.support.paths import REPO

EXAMPLE = REPO / "examples" / "smollm2-local.yaml"


@dataclass(frozen=True)
class OperatorTarget:
    """Where the operator serves /metrics, and its log."""

    address: str
    log: Path

    def group_states(self) -> dict[str, float]:
        """largemodel_operator_groups by state, straight from /metrics."""
        body = httpx.get(f"http://{self.address}/metrics", timeout=5.0).text
        return {
            sample.labels["state"]: sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "largemodel_operator_groups"
        }

    def wait_until_exercised(self, timeout_s: float = 60.0) -> None:
        """Wait until one group is ready and the crash-looping one has been given up (failed)."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, float] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                states = self.group_states()
                if states.get("ready", 0) >= 1 and states.get("failed", 0) >= 1:
                    return
            time.sleep(0.5)
        raise AssertionError(f"operator never reported a ready and a failed group: {states}\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")


def _manifest(workdir: Path, name: str) -> Path:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    body["spec"]["replicas"] = 2
    body["spec"]["restart"] = {"maxGroupRestarts": 1, "windowSeconds": 600, "backoffSeconds": 0}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@contextlib.contextmanager
def running_operator_target(workdir: Path, namespace: str, name: str) -> Iterator[OperatorTarget]:
    """Mock API server + kubelet + `largemodel operator -n NAMESPACE`; LargeModel `name` applied."""
    from tests.support.kubelet import Kubelet
    from tests.support.mockcluster import running_cluster

    port = free_port()
    log = workdir / "operator.log"
    with running_cluster(workdir, [namespace]) as cluster, Kubelet(cluster, [namespace]) as kubelet:
        kubelet.crashloop.add(f"{name}-g1")
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONSAFEPATH": "1"}
        command = [sys.executable, "-m", "largemodel.operator.cli", "operator", "-n", namespace,
                   "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--resync-seconds", "5"]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"operator exited with {proc.returncode}\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"operator not healthy after 60s\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            cluster.kubectl("apply", "--validate=false", "-n", namespace, "-f", str(_manifest(workdir, name)))
            yield OperatorTarget(f"127.0.0.1:{port}", log)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
