"""`largemodel operator` as a user runs it: flags, scope, /healthz and /metrics, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from largemodel.runtime.local import free_port
from tests.support.mockcluster import MockCluster, apps_path, lm_path
from tests.support.operatorrun import assert_within_rbac, wait_for
from tests.support.paths import REPO

LARGEMODEL = Path(sys.executable).parent / "largemodel"
EXAMPLE = REPO / "examples" / "smollm2-local.yaml"


def test_scope_flag_is_required() -> None:
    done = subprocess.run([str(LARGEMODEL), "operator"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--namespace" in done.stderr and "--all-namespaces" in done.stderr and "Traceback" not in done.stderr


def test_bad_metrics_port_is_a_clear_error() -> None:
    done = subprocess.run([str(LARGEMODEL), "operator", "-A", "--metrics-port", "99999"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--metrics-port" in done.stderr and "Traceback" not in done.stderr


def test_all_namespaces_health_metrics_and_sigterm(cluster: MockCluster) -> None:
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(
        [str(LARGEMODEL), "operator", "--all-namespaces", "--metrics-address", "127.0.0.1",
         "--metrics-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "/healthz to answer 200", timeout=60)
        for ns in ("models", "other"):
            cluster.kubectl("apply", "--validate=false", "-n", ns, "-f", str(EXAMPLE))
        for ns in ("models", "other"):
            wait_for(lambda ns=ns: cluster.get(apps_path("statefulsets", ns, "smollm2-g0")), f"children in {ns}")
            wait_for(lambda ns=ns: (cluster.get(lm_path(ns, "smollm2")) or {}).get("status"), f"status in {ns}")
        # Issue 14, defect 6 on the operator's port too: an idle connection and a slowloris head are
        # cut within the guarded server's limits (5 s per read, 10 s per connection) and the
        # probes keep answering meanwhile.
        began = time.monotonic()
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        for sock in (idle, slow):
            sock.settimeout(15)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        assert time.monotonic() - began < 14, "the operator's metrics port held a connection open"
        assert httpx.get(url + "/nope", timeout=5).status_code == 404
        body = httpx.get(url + "/metrics", timeout=5).text
        assert "largemodel_operator_reconcile_seconds_count" in body
        assert 'largemodel_operator_api_requests_total{resource="statefulsets",verb="create"} 2.0' in body
        assert 'largemodel_operator_groups{state="progressing"} 2.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    assert_within_rbac(cluster)
