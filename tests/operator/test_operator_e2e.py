"""End to end: the real operator (KopfRunner) against K8sMock, driven with the real kubectl.

The test plays the StatefulSet controller and the kubelet (kubelet.py). Assertions are on
objects in the API server and on status, never on logs. Every test also checks that the
operator used only verbs that operator/rbac.py grants.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import Kubelet
from memworld import ROOT
from mockcluster import MockCluster, apps_path, core_path, lm_path
from operatorrun import assert_within_rbac, operator_requests, operator_writes, running_operator, wait_for

from largemodel.operator.builders import LABEL_NAME, LABEL_REVISION
from largemodel.operator.conditions import find

NS = "models"
EXAMPLE = ROOT / "examples" / "smollm2-local.yaml"


@pytest.fixture()
def kubelet(cluster: MockCluster) -> Iterator[Kubelet]:
    """The StatefulSet controller and kubelet of the test cluster."""
    with Kubelet(cluster, [NS]) as running:
        yield running


def manifest(tmp_path: Path, name: str = "smollm2", **spec: Any) -> Path:
    """examples/smollm2-local.yaml with a name and spec overrides, written for kubectl."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    for key, value in spec.items():
        current = body["spec"].get(key)
        body["spec"][key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def model(cluster: MockCluster, name: str = "smollm2") -> dict[str, Any]:
    """The LargeModel as stored."""
    body = cluster.get(lm_path(NS, name))
    assert body is not None, f"LargeModel {name} is gone"
    return body


def condition(body: dict[str, Any], kind: str) -> str:
    """status of condition `kind` ("" if absent)."""
    cond = find((body.get("status") or {}).get("conditions") or [], kind)
    return str(cond["status"]) if cond else ""


def phase(cluster: MockCluster, name: str = "smollm2") -> str:
    """status.phase of a LargeModel."""
    return str((model(cluster, name).get("status") or {}).get("phase", ""))


def groups(cluster: MockCluster, name: str = "smollm2") -> dict[str, dict[str, Any]]:
    """Group StatefulSets of a LargeModel by name."""
    return {s["metadata"]["name"]: s for s in cluster.list(apps_path("statefulsets", NS), f"{LABEL_NAME}={name}")}


def events(cluster: MockCluster, name: str = "smollm2") -> list[str]:
    """Reasons of the Events about a LargeModel, oldest first."""
    return [e["reason"] for e in cluster.list(core_path("events", NS))
            if e.get("involvedObject", {}).get("name") == name]


def settle_and_count_writes(cluster: MockCluster, poke: Any, name: str = "smollm2") -> int:
    """Poke the operator (so it runs passes) and count its writes meanwhile."""
    reads_before = sum(1 for r in operator_requests(cluster) if r.name == name and str(r.method.value) == "GET")
    writes_before = len(operator_writes(cluster))
    for _ in range(3):
        poke()
        time.sleep(0.3)
    wait_for(lambda: sum(1 for r in operator_requests(cluster) if r.name == name and str(r.method.value) == "GET")
             >= reads_before + 2, "the operator to run passes after the pokes")
    return len(operator_writes(cluster)) - writes_before


def test_create_ready_steady_state_and_delete(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(EXAMPLE))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready")
        body = model(cluster)
        status = body["status"]
        assert status["readyReplicas"] == 1 and status["replicas"] == 1
        assert status["observedGeneration"] == body["metadata"]["generation"]
        assert {condition(body, c) for c in ("Admitted", "Ready")} == {"True"}
        assert condition(body, "Progressing") == "False" and condition(body, "Degraded") == "False"
        assert status["plan"]["tensor"] == 1 and status["plan"]["pipeline"] == 2
        assert status["endpoint"] == f"http://smollm2.{NS}.svc:8000/v1"
        assert status["selector"] == f"{LABEL_NAME}=smollm2"
        assert status["groups"] == [
            {"index": 0, "ready": True, "restarts": 0, "revision": status["revision"], "state": "Ready"}
        ]
        sts = groups(cluster)["smollm2-g0"]
        assert sts["spec"]["replicas"] == 2 and sts["metadata"]["labels"][LABEL_REVISION] == status["revision"]
        assert sts["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        services = {s["metadata"]["name"] for s in cluster.list(core_path("services", NS), f"{LABEL_NAME}=smollm2")}
        assert services == {"smollm2", "smollm2-ranks"}
        assert {"Planned", "CreatedService", "CreatedGroup", "Ready"} <= set(events(cluster))
        # Every write carried the field manager.
        ours = [r for r in operator_writes(cluster) if "largemodel-operator" in r.headers.get("User-Agent", "")]
        assert ours and all(r.params.get("fieldManager") == "largemodel-operator" for r in ours
                            if str(r.method.value) != "DELETE")

        # Steady state: metadata-only edits and pod touches make the operator look again, and write nothing.
        def poke() -> None:
            cluster.patch(lm_path(NS, "smollm2"), {"metadata": {"labels": {"poked": str(time.monotonic_ns())}}})
            cluster.patch(core_path("pods", NS, "smollm2-g0-0"), {"metadata": {"annotations": {"t": str(time.time())}}})

        assert settle_and_count_writes(cluster, poke) == 0

        cluster.kubectl("delete", "-n", NS, "lm/smollm2")
        wait_for(lambda: cluster.get(lm_path(NS, "smollm2")) is None, "the LargeModel to be gone")
        assert groups(cluster) == {}
        assert cluster.list(core_path("services", NS), f"{LABEL_NAME}=smollm2") == []
    used = assert_within_rbac(cluster)
    assert {
        ("serving.largemodel.io", "largemodels", "watch"), ("serving.largemodel.io", "largemodels/status", "patch"),
        ("apps", "statefulsets", "create"), ("", "services", "create"), ("", "pods", "list"), ("", "events", "create"),
    } <= used
