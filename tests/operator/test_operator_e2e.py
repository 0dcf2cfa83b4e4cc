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

from largemodel.operator.builders import LABEL_NAME, LABEL_REVISION
from largemodel.operator.conditions import find
from tests.support.kubelet import Kubelet
from tests.support.mockcluster import MockCluster, apps_path, core_path, lm_path
from tests.support.operatorrun import (
    assert_within_rbac,
    operator_requests,
    operator_writes,
    running_operator,
    wait_for,
)
from tests.support.paths import REPO

NS = "models"
EXAMPLE = REPO / "examples" / "smollm2-local.yaml"


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


def _writes_quiet(cluster: MockCluster, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The operator's write count once it has made none for `quiet` s: what the last transition still owed
    (kopf posts an Event after the status patch that showed it) lands before counting starts. An operator
    that keeps writing fails here."""
    deadline = time.monotonic() + timeout
    count, since = len(operator_writes(cluster)), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(operator_writes(cluster))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return count
    raise AssertionError(f"the operator kept writing for {timeout}s ({count} writes so far)")


def settle_and_count_writes(cluster: MockCluster, poke: Any, name: str = "smollm2") -> int:
    """Once the operator's writes are quiet, poke it (so it runs passes) and count its writes meanwhile."""
    writes_before = _writes_quiet(cluster)
    reads_before = sum(1 for r in operator_requests(cluster) if r.name == name and str(r.method.value) == "GET")
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
        (group,) = status["groups"]
        assert {k: group[k] for k in ("index", "ready", "restarts", "revision", "state", "startPhase")} == {
            "index": 0, "ready": True, "restarts": 0, "revision": status["revision"], "state": "Ready",
            "startPhase": "Ready"}
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
        ("", "secrets", "create"), ("networking.k8s.io", "networkpolicies", "create"),
    } <= used
    # The group Secret is created blind and never read back.
    assert not {verb for group, plural, verb in used if plural == "secrets"} - {"create"}


def test_invalid_then_fixed(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(manifest(tmp_path, parallelism={"tensor": 2})))
        wait_for(lambda: phase(cluster) == "Failed", "phase Failed")
        body = model(cluster)
        admitted = find(body["status"]["conditions"], "Admitted")
        assert admitted["status"] == "False" and admitted["reason"] == "InvalidSpec"
        assert "valid tensor sizes: 1, 3" in admitted["message"]
        wait_for(lambda: "InvalidSpec" in events(cluster), "an InvalidSpec Event")
        assert groups(cluster) == {} and cluster.list(core_path("services", NS)) == []
        # A user error never loops: the invalid model makes no more writes.
        assert settle_and_count_writes(
            cluster, lambda: cluster.patch(lm_path(NS, "smollm2"), {"metadata": {"labels": {"t": str(time.time_ns())}}})
        ) == 0
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(manifest(tmp_path, parallelism={"tensor": 1})))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready after the fix")
        assert condition(model(cluster), "Admitted") == "True" and list(groups(cluster)) == ["smollm2-g0"]
    assert_within_rbac(cluster)


def test_scale_1_3_1_with_kubectl_scale(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(EXAMPLE))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready")
        cluster.kubectl("scale", "-n", NS, "lm/smollm2", "--replicas=3")
        wait_for(lambda: model(cluster)["status"]["readyReplicas"] == 3 and phase(cluster) == "Ready", "3 ready groups")
        assert sorted(groups(cluster)) == ["smollm2-g0", "smollm2-g1", "smollm2-g2"]
        scale = cluster.get(lm_path(NS, "smollm2") + "/scale")
        assert scale["status"]["replicas"] == 3 and scale["status"]["selector"] == f"{LABEL_NAME}=smollm2"
        first_g0 = groups(cluster)["smollm2-g0"]["metadata"]["uid"]
        cluster.kubectl("scale", "-n", NS, "lm/smollm2", "--replicas=1")
        wait_for(lambda: list(groups(cluster)) == ["smollm2-g0"] and model(cluster)["status"]["replicas"] == 1,
                 "scale down to g0")
        deleted = [r.name for r in operator_writes(cluster) if str(r.method.value) == "DELETE"]
        assert deleted == ["smollm2-g2", "smollm2-g1"]  # whole groups, highest index first
        assert groups(cluster)["smollm2-g0"]["metadata"]["uid"] == first_g0  # g0 untouched
        assert model(cluster)["status"]["readyReplicas"] == 1
    assert_within_rbac(cluster)


def test_rollout_of_three_groups_one_at_a_time(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    kubelet.ready_delay = 0.3  # long enough that two groups down at once could not go unseen
    with running_operator(cluster, [NS]):
        path = manifest(tmp_path, replicas=3, rollout={"maxUnavailableGroups": 1})
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(path))
        wait_for(lambda: model(cluster)["status"]["readyReplicas"] == 3, "3 ready groups")
        old = model(cluster)["status"]["revision"]
        kubelet.watch_replicas["smollm2"] = 3
        body = yaml.safe_load(path.read_text())
        body["spec"]["image"] = "largemodel-runtime:0.2.0"
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", "-", stdin=yaml.safe_dump(body))
        new = wait_for(lambda: model(cluster)["status"]["revision"] != old and model(cluster)["status"]["revision"],
                       "a new revision")

        def rolled() -> bool:
            sets = groups(cluster)
            return (len(sets) == 3 and all(s["metadata"]["labels"][LABEL_REVISION] == new for s in sets.values())
                    and phase(cluster) == "Ready")

        wait_for(rolled, "all groups at the new revision and Ready", timeout=30)
        assert kubelet.max_unavailable["smollm2"] == 1
        deleted = [r.name for r in operator_writes(cluster) if str(r.method.value) == "DELETE"]
        assert deleted == ["smollm2-g2", "smollm2-g1", "smollm2-g0"]
        assert "RollingGroup" in events(cluster)
    assert_within_rbac(cluster)


def test_pod_failure_recreates_the_group(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    with running_operator(cluster, [NS]):
        path = manifest(tmp_path, restart={"maxGroupRestarts": 5, "backoffSeconds": 0})
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(path))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready")
        wait_for(lambda: groups(cluster)["smollm2-g0"]["metadata"].get("annotations"), "members recorded")
        first = groups(cluster)["smollm2-g0"]["metadata"]["uid"]
        # A deleted pod: the StatefulSet controller (the test) replaces it; the group is recreated.
        cluster.kubectl("delete", "-n", NS, "pod/smollm2-g0-1", "--wait=false")
        second = wait_for(lambda: (uid := groups(cluster)["smollm2-g0"]["metadata"]["uid"]) != first and uid,
                          "a new incarnation of g0")
        wait_for(lambda: phase(cluster) == "Ready" and model(cluster)["status"]["groups"][0]["restarts"] == 1,
                 "Ready again after 1 restart")
        # A container restart in a pod of the group: recreated again.
        wait_for(lambda: groups(cluster)["smollm2-g0"]["metadata"].get("annotations"), "members recorded")
        kubelet.set_pod_status(NS, "smollm2-g0-0", ready=True, restarts=1)
        wait_for(lambda: groups(cluster)["smollm2-g0"]["metadata"]["uid"] not in (first, second), "a third incarnation")
        wait_for(lambda: phase(cluster) == "Ready" and model(cluster)["status"]["groups"][0]["restarts"] == 2,
                 "Ready again after 2 restarts")
        assert events(cluster).count("GroupFailed") == 2
    assert_within_rbac(cluster)


def test_crash_loop_exhausts_budget_and_degrades(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    kubelet.crashloop.add("smollm2-g0")
    with running_operator(cluster, [NS]):
        # Never Ready: every restart is a startup restart (issue 17), with its own budget.
        path = manifest(tmp_path, restart={"maxStartupRestarts": 2, "windowSeconds": 600, "backoffSeconds": 1})
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(path))
        wait_for(lambda: phase(cluster) == "Degraded", "phase Degraded", timeout=30)
        body = model(cluster)
        assert condition(body, "Degraded") == "True" and condition(body, "Ready") == "False"
        assert body["status"]["groups"][0]["state"] == "Down" and body["status"]["groups"][0]["startupRestarts"] == 2
        wait_for(lambda: groups(cluster) == {}, "the group left down")
        assert events(cluster).count("GroupFailed") == 2
        wait_for(lambda: "RestartBudgetExhausted" in events(cluster), "a RestartBudgetExhausted Event")
        creates = [r for r in operator_writes(cluster) if str(r.method.value) == "POST" and r.resource.plural == "statefulsets"]
        assert len(creates) == 3  # the first start and two restarts, no more
    assert_within_rbac(cluster)


def test_operator_restart_mid_rollout(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    kubelet.ready_delay = 0.5
    path = manifest(tmp_path, replicas=3)
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(path))
        wait_for(lambda: model(cluster)["status"]["readyReplicas"] == 3, "3 ready groups", timeout=30)
        old = model(cluster)["status"]["revision"]
        body = yaml.safe_load(path.read_text())
        body["spec"]["image"] = "largemodel-runtime:0.2.0"
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", "-", stdin=yaml.safe_dump(body))
        wait_for(lambda: any(s["metadata"]["labels"][LABEL_REVISION] != old for s in groups(cluster).values()),
                 "the first group recreated at the new revision")
    # The operator is down mid-rollout; it comes back and finishes without duplicating anything.
    with running_operator(cluster, [NS]):
        def rolled() -> bool:
            sets = groups(cluster)
            return (len(sets) == 3 and all(s["metadata"]["labels"][LABEL_REVISION] != old for s in sets.values())
                    and phase(cluster) == "Ready")

        wait_for(rolled, "the rollout finished by the second operator", timeout=30)
    creates = [r for r in operator_writes(cluster) if str(r.method.value) == "POST"
               and r.resource.plural in ("statefulsets", "services")]
    assert len([r for r in creates if r.resource.plural == "statefulsets"]) == 6  # 3 first + 3 rolled, no duplicate
    assert len([r for r in creates if r.resource.plural == "services"]) == 2
    assert len(cluster.list(core_path("services", NS), f"{LABEL_NAME}=smollm2")) == 2
    assert_within_rbac(cluster)


def test_fifty_models_converge(cluster: MockCluster, kubelet: Kubelet, tmp_path: Path) -> None:
    docs = []
    for i in range(50):
        body = yaml.safe_load(EXAMPLE.read_text())
        body["metadata"]["name"] = f"m{i:02d}"
        docs.append(yaml.safe_dump(body))
    (tmp_path / "all.yaml").write_text("---\n".join(docs))
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(tmp_path / "all.yaml"))

        def all_ready() -> bool:
            items = cluster.list(lm_path(NS))
            return len(items) == 50 and all((m.get("status") or {}).get("phase") == "Ready" for m in items)

        wait_for(all_ready, "50 Ready LargeModels", timeout=90)
        assert len(cluster.list(apps_path("statefulsets", NS))) == 50
        assert len(cluster.list(core_path("services", NS))) == 100
        assert len(cluster.list(core_path("pods", NS))) == 100

        def poke() -> None:
            cluster.patch(lm_path(NS, "m00"), {"metadata": {"labels": {"poked": str(time.monotonic_ns())}}})

        assert settle_and_count_writes(cluster, poke, name="m00") == 0
    assert_within_rbac(cluster)


def test_namespaced_operator_ignores_other_namespaces(cluster: MockCluster, kubelet: Kubelet) -> None:
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", "other", "-f", str(EXAMPLE))
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(EXAMPLE))
        wait_for(lambda: phase(cluster) == "Ready", "the model in the watched namespace Ready")
    assert "status" not in (cluster.get(lm_path("other", "smollm2")) or {})
    assert cluster.list(apps_path("statefulsets", "other")) == []
    # No cluster-wide list or watch but of Nodes (cluster-scoped, issue 17), and nothing in a namespace
    # it was not given.
    requests = [r for r in operator_requests(cluster) if r.resource is not None and r.resource.plural]
    assert {r.namespace for r in requests if r.resource.plural != "nodes"} == {NS}
    assert {str(r.method.value) for r in requests if r.resource.plural == "nodes"} <= {"GET"}


def test_conflicts_and_server_errors_are_retried(cluster: MockCluster, kubelet: Kubelet) -> None:
    cluster.mock.fail_next("POST", "statefulsets", 503, times=2)
    cluster.mock.fail_next("PATCH", "largemodels", 409, times=2, subresource="status")
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(EXAMPLE))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready despite the injected errors", timeout=30)
        posts = [r for r in operator_writes(cluster) if str(r.method.value) == "POST" and r.resource.plural == "statefulsets"]
        assert len(posts) == 3  # two refused, the third created the group
        assert list(groups(cluster)) == ["smollm2-g0"]
        # An expired token (401) makes the operator read its credentials again and carry on.
        cluster.mock.fail_next("GET", "largemodels", 401, name="smollm2", agent="largemodel-operator")
        cluster.patch(lm_path(NS, "smollm2"), {"spec": {"replicas": 2}})
        wait_for(lambda: model(cluster)["status"]["readyReplicas"] == 2, "scaled to 2 after the 401", timeout=30)
        assert not any(f[-1] for f in cluster.mock._faults)  # every injected error was hit
    assert_within_rbac(cluster)


def test_watches_are_filtered_by_the_name_label(cluster: MockCluster, kubelet: Kubelet) -> None:
    cluster.create(core_path("pods", NS), {"metadata": {"name": "unrelated", "labels": {"app": "x"}}})
    with running_operator(cluster, [NS]):
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(EXAMPLE))
        wait_for(lambda: phase(cluster) == "Ready", "phase Ready")
    watches = {r.resource.plural: r.params.get("labelSelector", "") for r in operator_requests(cluster)
               if r.resource is not None and r.params.get("watch") == "true"}
    assert watches["pods"] == watches["statefulsets"] == watches["services"] == watches["networkpolicies"] == LABEL_NAME
    assert watches["largemodels"] == ""
