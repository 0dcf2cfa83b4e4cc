"""The mock API server's additions behave like a real API server (what the operator relies on)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.k8smock import matches_selector
from tests.support.mockcluster import MockCluster, apps_path, core_path, lm_path

NS = "models"


def _lm(name: str, replicas: int = 1) -> dict:
    return {
        "apiVersion": "serving.largemodel.io/v1alpha1", "kind": "LargeModel",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {"model": {"uri": "hf://x/y"}, "replicas": replicas},
        "status": {"phase": "Ready"},
    }


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True), ("a=1", True), ("a==1", True), ("a=2", False), ("a!=2", True), ("a!=1", False),
        ("b", True), ("!b", False), ("c", False), ("!c", True), ("a in (1,3)", True),
        ("a notin (1,3)", False), ("a in (2,3),b=x", False), ("a=1,b=x", True), ("c notin (1)", True),
    ],
)
def test_label_selectors(selector: str, expected: bool) -> None:
    assert matches_selector({"a": "1", "b": "x"}, selector) is expected


def test_create_sets_identity_and_ignores_status(cluster: MockCluster) -> None:
    created = cluster.create(lm_path(NS), _lm("one"))
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1 and meta["creationTimestamp"]
    assert created["apiVersion"] == "serving.largemodel.io/v1alpha1" and created["kind"] == "LargeModel"
    assert meta["namespace"] == NS
    assert "status" not in created  # the status subresource owns status
    with pytest.raises(httpx.HTTPStatusError) as err:
        cluster.create(lm_path(NS), _lm("one"))
    assert err.value.response.status_code == 409 and err.value.response.json()["reason"] == "AlreadyExists"


def test_generate_name(cluster: MockCluster) -> None:
    event = cluster.create(core_path("events", NS), {"metadata": {"generateName": "ev-"}, "reason": "X"})
    assert event["metadata"]["name"].startswith("ev-") and len(event["metadata"]["name"]) > 3


def test_patch_bumps_versions_and_splits_status(cluster: MockCluster) -> None:
    created = cluster.create(lm_path(NS), _lm("one"))
    rv0 = int(created["metadata"]["resourceVersion"])
    # A status change through the main resource is dropped; spec changes bump generation.
    patched = cluster.patch(lm_path(NS, "one"), {"spec": {"replicas": 2}, "status": {"phase": "X"}})
    assert patched["metadata"]["generation"] == 2 and int(patched["metadata"]["resourceVersion"]) > rv0
    assert "status" not in patched
    # Status goes through /status, which touches nothing else and leaves generation alone.
    status = cluster.patch(lm_path(NS, "one") + "/status", {"status": {"phase": "Ready"}, "spec": {"replicas": 9}})
    assert status["status"] == {"phase": "Ready"} and status["spec"]["replicas"] == 2
    assert status["metadata"]["generation"] == 2
    # Metadata-only changes bump resourceVersion but not generation; a no-op changes nothing.
    labelled = cluster.patch(lm_path(NS, "one"), {"metadata": {"labels": {"team": None, "x": "y"}}})
    assert labelled["metadata"]["labels"] == {"x": "y"} and labelled["metadata"]["generation"] == 2
    same = cluster.patch(lm_path(NS, "one"), {"metadata": {"labels": {"x": "y"}}})
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]


def test_stale_resource_version_conflicts(cluster: MockCluster) -> None:
    created = cluster.create(lm_path(NS), _lm("one"))
    cluster.patch(lm_path(NS, "one"), {"spec": {"replicas": 3}})
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "spec": {"replicas": 4}}
    with pytest.raises(httpx.HTTPStatusError) as err:
        cluster.patch(lm_path(NS, "one"), stale)
    assert err.value.response.status_code == 409
    assert cluster.get(lm_path(NS, "one"))["spec"]["replicas"] == 3


def test_scale_subresource(cluster: MockCluster) -> None:
    cluster.create(lm_path(NS), _lm("one", replicas=1))
    cluster.patch(lm_path(NS, "one") + "/status", {"status": {"replicas": 1, "selector": "a=b"}})
    scale = cluster.get(lm_path(NS, "one") + "/scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    assert scale["status"] == {"replicas": 1, "selector": "a=b"}
    cluster.patch(lm_path(NS, "one") + "/scale", {"spec": {"replicas": 3}})
    lm = cluster.get(lm_path(NS, "one"))
    assert lm["spec"]["replicas"] == 3 and lm["metadata"]["generation"] == 2


def test_list_by_label_selector(cluster: MockCluster) -> None:
    for name, labels in [("a", {"app": "x", "g": "0"}), ("b", {"app": "x", "g": "1"}), ("c", {"app": "y"})]:
        cluster.create(core_path("services", NS), {"metadata": {"name": name, "labels": labels}})
    assert {s["metadata"]["name"] for s in cluster.list(core_path("services", NS), "app=x")} == {"a", "b"}
    assert [s["metadata"]["name"] for s in cluster.list(core_path("services", NS), "app=x,g=1")] == ["b"]
    assert len(cluster.list(core_path("services", "other"))) == 0


def test_delete_cascades_through_owner_references(cluster: MockCluster) -> None:
    owner = cluster.create(lm_path(NS), _lm("one"))
    ref = {"apiVersion": "serving.largemodel.io/v1alpha1", "kind": "LargeModel", "name": "one",
           "uid": owner["metadata"]["uid"], "controller": True}
    sts = cluster.create(apps_path("statefulsets", NS), {"metadata": {"name": "one-g0", "ownerReferences": [ref]}})
    sts_ref = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "one-g0", "uid": sts["metadata"]["uid"]}
    cluster.create(core_path("pods", NS), {"metadata": {"name": "one-g0-0", "ownerReferences": [sts_ref]}})
    cluster.create(core_path("pods", NS), {"metadata": {"name": "unrelated"}})
    assert cluster.delete(lm_path(NS, "one"))
    assert cluster.get(apps_path("statefulsets", NS, "one-g0")) is None
    assert cluster.get(core_path("pods", NS, "one-g0-0")) is None
    assert cluster.get(core_path("pods", NS, "unrelated")) is not None
    assert not cluster.delete(lm_path(NS, "one"))  # 404 the second time


def test_finalizers_hold_deletion_until_removed(cluster: MockCluster) -> None:
    body = _lm("one")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    owner = cluster.create(lm_path(NS), body)
    ref = {"apiVersion": "v1", "kind": "X", "name": "one", "uid": owner["metadata"]["uid"]}
    cluster.create(core_path("services", NS), {"metadata": {"name": "child", "ownerReferences": [ref]}})
    cluster.delete(lm_path(NS, "one"))
    held = cluster.get(lm_path(NS, "one"))
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert cluster.get(core_path("services", NS, "child")) is not None
    cluster.patch(lm_path(NS, "one"), {"metadata": {"finalizers": None}})
    assert cluster.get(lm_path(NS, "one")) is None
    assert cluster.get(core_path("services", NS, "child")) is None


def test_kubectl_apply_get_scale_delete(cluster: MockCluster, tmp_path) -> None:
    manifest = tmp_path / "lm.yaml"
    manifest.write_text(
        "apiVersion: serving.largemodel.io/v1alpha1\nkind: LargeModel\nmetadata: {name: kc}\n"
        "spec: {model: {uri: 'hf://x/y'}, replicas: 1}\n"
    )
    cluster.kubectl("apply", "--validate=false", "-f", str(manifest))
    assert cluster.get(lm_path(NS, "kc"))["spec"]["replicas"] == 1
    manifest.write_text(manifest.read_text().replace("replicas: 1", "replicas: 2"))
    cluster.kubectl("apply", "--validate=false", "-f", str(manifest))
    assert cluster.get(lm_path(NS, "kc"))["spec"]["replicas"] == 2
    cluster.kubectl("scale", "largemodels/kc", "--replicas=3")
    assert cluster.get(lm_path(NS, "kc"))["spec"]["replicas"] == 3
    cluster.kubectl("delete", "largemodels/kc")
    assert cluster.get(lm_path(NS, "kc")) is None


def test_object_created_for_a_gone_owner_is_collected(cluster: MockCluster) -> None:
    ref = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "gone", "uid": "no-such-uid"}
    cluster.create(core_path("pods", NS), {"metadata": {"name": "orphan", "ownerReferences": [ref]}})
    assert cluster.get(core_path("pods", NS, "orphan")) is None


def test_kubectl_finds_core_resources(cluster: MockCluster) -> None:
    cluster.create(core_path("pods", NS), {"metadata": {"name": "p"}})
    assert "p" in cluster.kubectl("get", "-n", NS, "pods", "-o", "name").stdout
    cluster.kubectl("delete", "-n", NS, "pod/p", "--wait=false")
    assert cluster.get(core_path("pods", NS, "p")) is None


def test_injected_faults_answer_then_clear(cluster: MockCluster) -> None:
    cluster.mock.fail_next("POST", "services", 503, times=2)
    for _ in range(2):
        with pytest.raises(httpx.HTTPStatusError) as err:
            cluster.create(core_path("services", NS), {"metadata": {"name": "s"}})
        assert err.value.response.status_code == 503
    assert cluster.create(core_path("services", NS), {"metadata": {"name": "s"}})["metadata"]["name"] == "s"


def test_delete_precondition_uid(cluster: MockCluster) -> None:
    cluster.create(core_path("services", NS), {"metadata": {"name": "s"}})
    reply = cluster.http.request("DELETE", core_path("services", NS, "s"), json={"preconditions": {"uid": "old"}})
    assert reply.status_code == 409 and cluster.get(core_path("services", NS, "s")) is not None


def test_orphan_propagation_keeps_dependents(cluster: MockCluster) -> None:
    owner = cluster.create(core_path("services", NS), {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "Service", "name": "owner", "uid": owner["metadata"]["uid"]}
    cluster.create(core_path("pods", NS), {"metadata": {"name": "kept", "ownerReferences": [ref]}})
    cluster.http.request("DELETE", core_path("services", NS, "owner"), params={"propagationPolicy": "Orphan"})
    assert cluster.get(core_path("services", NS, "owner")) is None
    assert cluster.get(core_path("pods", NS, "kept")) is not None
