"""The operator runs as the chart deploys it: its command line, probes, metrics and Role.

The rendered Deployment's command and args start the real `largemodel operator` process against
the operator team's mock API server (tests/support/mockcluster.py, the kubeconfig standing in for
the projected token); the test then plays the kubelet's probes, applies an example with kubectl,
and checks every request the operator made against the rules of the rendered Role or ClusterRole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from largemodel.runtime.local import free_port
from tests.support.chartrender import by_kind, render_objects
from tests.support.mockcluster import MockCluster, lm_path, running_cluster  # noqa: E402
from tests.support.operatorrun import operator_requests, rbac_triple, wait_for  # noqa: E402
from tests.support.paths import REPO

NAMESPACE = "models"
BIN = Path(sys.executable).parent


@pytest.fixture(params=["namespaced", "cluster-wide"])
def deployed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[MockCluster, dict[str, Any], list[dict[str, Any]], int]]:
    """The operator process of a namespaced or cluster-wide install, running against a mock cluster."""
    values: dict[str, Any] = {"operator": {"metricsPort": free_port(), "resyncSeconds": 30}}
    if request.param == "namespaced":
        values["watch"] = {"allNamespaces": False, "namespaces": [NAMESPACE]}
    objects = render_objects(values)
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    with running_cluster(tmp_path, [NAMESPACE]) as cluster:
        env = {**os.environ, **{e["name"]: NAMESPACE for e in container["env"] if "valueFrom" in e},
               **{e["name"]: e["value"] for e in container["env"] if "value" in e},
               "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        log = (tmp_path / "operator.log").open("w")
        process = subprocess.Popen([*container["command"], *container["args"]], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield cluster, container, by_kind(objects, "Role") + by_kind(objects, "ClusterRole"), process.pid
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            log.close()


def _probe(container: dict[str, Any], probe: str) -> httpx.Response:
    """What the kubelet's httpGet probe sees."""
    get = container[probe]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == get["port"])
    return httpx.get(f"http://127.0.0.1:{port}{get['path']}", timeout=2)


def _healthy(container: dict[str, Any]) -> bool:
    try:
        return _probe(container, "readinessProbe").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(90)
def test_operator_runs_as_the_chart_deploys_it(
    deployed: tuple[MockCluster, dict[str, Any], list[dict[str, Any]], int], tmp_path: Path
) -> None:
    cluster, container, roles, pid = deployed
    wait_for(lambda: _healthy(container), "the readiness probe to pass", timeout=30)
    assert _probe(container, "livenessProbe").status_code == 200
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    assert "largemodel_operator_reconcile_seconds" in metrics

    cluster.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", str(REPO / "examples" / "llama3-70b.yaml"))
    admitted = wait_for(
        lambda: [c for c in ((cluster.get(lm_path(NAMESPACE, "llama3-70b")) or {}).get("status") or {}).get(
            "conditions", []) if c["type"] == "Admitted" and c["status"] == "True"],
        "the LargeModel to be admitted", timeout=30,
    )
    assert "tp=8 pp=1" in admitted[0]["message"]

    requests = [r for r in operator_requests(cluster) if rbac_triple(r) is not None]

    def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
        return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
                for resource in rule["resources"] for verb in rule["verbs"]}

    namespaced = [role for role in roles if role["kind"] == "Role"]
    cluster_wide = set().union(*(grants(role) for role in roles if role["kind"] == "ClusterRole"))
    if namespaced:
        # A Role grants nothing outside its namespace: a namespaced install lists namespaced objects only
        # there; what it reads cluster-wide (Nodes, for the Schedulable condition) a ClusterRole grants.
        assert {role["metadata"]["namespace"] for role in namespaced} == {NAMESPACE}
        assert {r.namespace for r in requests if r.namespace} == {NAMESPACE}
        assert all(rbac_triple(r) in cluster_wide for r in requests if not r.namespace)
    used = {rbac_triple(r) for r in requests}
    granted = cluster_wide.union(*(grants(role) for role in namespaced))
    assert used and used <= granted, f"the rendered roles lack {sorted(used - granted)}"

    # Recreate strategy relies on the old operator stopping on SIGTERM.
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _gone(pid):
        time.sleep(0.1)
    assert _gone(pid), "the operator ignored SIGTERM for 20 s"


def _gone(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return finished == pid
