"""Issue 17 in the in-memory world: gang scheduling, topology, fit before scheduling, startup and lifecycle.

Pure reconcile passes (tests/support/memworld.py plays the API server, the StatefulSet controller
and the kubelet); the kmock end-to-end runs are in test_operator_e2e_cluster.py.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from largemodel.operator import api, fit, gang, lifecycle
from largemodel.operator.builders import LABEL_GROUP_KEY, build_group_statefulset, template_revision
from largemodel.operator.conditions import find
from largemodel.operator.planner import plan_parallelism
from tests.support.memworld import World, example_lm

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden (a real server prunes them; drift would never settle)."""
    schema = copy.deepcopy(schema)
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return {k: _strict(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def podgroup_schema(api_version: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    crd = yaml.safe_load((SCHEMAS / f"{group}_podgroups.yaml").read_text())
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == "PodGroup"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _strict(served["schema"]["openAPIV3Schema"])


def podgroups(world: World) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for (kind, _), o in world.objects.items() if kind.startswith("PodGroup")}


def cond(world: World, kind: str) -> dict[str, Any]:
    found = find(world.lm["status"]["conditions"], kind)
    assert found is not None, kind
    return dict(found)


def template(world: World, name: str = "smollm2-g0") -> dict[str, Any]:
    return dict(world.objects[("StatefulSet", name)]["spec"]["template"])


# -- gang scheduling ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [gang.SCHEDULER_PLUGINS, gang.VOLCANO])
def test_podgroup_per_group_before_its_statefulset_valid_and_owned(mode: str) -> None:
    world = World(example_lm(replicas=2, placement={"gang": mode, **({"queueName": "llm"} if mode == "volcano" else {})}))
    first = world.step()
    creates = [a.obj["metadata"]["name"] + "/" + a.obj["kind"] for a in first.actions if hasattr(a, "obj")]
    for name in ("smollm2-g0", "smollm2-g1"):  # each group's PodGroup comes before its StatefulSet
        assert creates.index(f"{name}/PodGroup") < creates.index(f"{name}/StatefulSet")
    world.run_pods()
    world.converge()
    groups = podgroups(world)
    assert sorted(groups) == ["smollm2-g0", "smollm2-g1"]
    schema = podgroup_schema(gang.podgroup_api(mode) or "")
    for name, pg in groups.items():
        jsonschema.validate(pg, schema)
        assert pg["spec"]["minMember"] == 2 and pg["spec"]["minResources"] == {"nvidia.com/gpu": "2"}
        assert pg["metadata"]["ownerReferences"][0]["uid"] == "uid-smollm2"
        assert pg["metadata"]["labels"]["serving.largemodel.io/name"] == "smollm2"
        pod = template(world, name)
        if mode == gang.SCHEDULER_PLUGINS:
            assert pod["metadata"]["labels"][gang.SP_POD_GROUP_LABEL] == name
            assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
            assert pg["spec"]["scheduleTimeoutSeconds"] == 600
        else:
            assert pod["metadata"]["annotations"][gang.VOLCANO_GROUP_ANNOTATION] == name
            assert pod["spec"]["schedulerName"] == "volcano" and pg["spec"]["queue"] == "llm"
    assert world.lm["status"]["gang"] == mode
    assert world.step().writes == 0  # steady state


def test_podgroups_go_with_their_group_and_with_the_gang_mode() -> None:
    world = World(example_lm(replicas=2, placement={"gang": "scheduler-plugins"}))
    world.converge()
    world.edit(replicas=1)
    world.converge()
    assert sorted(podgroups(world)) == ["smollm2-g0"] and world.groups() == ["smollm2-g0"]
    # Drift is patched back.
    world.objects[(f"PodGroup {gang.SP_API_VERSION}", "smollm2-g0")]["spec"]["minMember"] = 1
    assert [type(a).__name__ for a in world.step().actions] == ["Patch"]
    assert podgroups(world)["smollm2-g0"]["spec"]["minMember"] == 2
    # Switching to volcano: the old PodGroups are deleted, volcano's created, groups roll.
    world.edit(placement={"gang": "volcano"})
    world.converge()
    assert {pg["apiVersion"] for pg in podgroups(world).values()} == {gang.VOLCANO_API_VERSION}
    world.edit(placement={"gang": "none"})
    world.converge()
    assert podgroups(world) == {} and "gang" not in world.lm["status"]
    assert "schedulerName" not in template(world)["spec"]


def test_kueue_gets_its_pod_group_labels_and_no_object() -> None:
    world = World(example_lm(placement={"gang": "kueue", "queueName": "team-a"}))
    world.converge()
    pod = template(world)
    assert pod["metadata"]["labels"][gang.KUEUE_POD_GROUP_LABEL] == "smollm2-g0"
    assert pod["metadata"]["labels"][gang.KUEUE_QUEUE_LABEL] == "team-a"
    assert pod["metadata"]["annotations"][gang.KUEUE_TOTAL_COUNT_ANNOTATION] == "2"
    assert "schedulerName" not in pod["spec"] and podgroups(world) == {}


def test_gang_without_its_crd_is_a_clear_condition_and_creates_nothing() -> None:
    world = World(example_lm(placement={"gang": "volcano"}))
    world.served = {gang.SP_API_VERSION}
    result = world.step()
    assert result.actions == ()
    admitted = cond(world, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "GangUnavailable")
    assert "scheduling.volcano.sh/v1beta1" in admitted["message"] and "Volcano" in admitted["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "GangUnavailable")]
    assert world.step().writes == 0 and world.step().events == ()  # said once, no loop
    world.served.add(gang.VOLCANO_API_VERSION)  # the admin installs Volcano
    world.converge()
    assert cond(world, "Admitted")["status"] == "True" and world.groups() == ["smollm2-g0"]


# -- topology -------------------------------------------------------------------------------------

def test_topology_key_requires_one_domain_and_exclusive_keeps_other_groups_out() -> None:
    world = World(example_lm(placement={"topologyKey": "example.com/nvlink-domain", "exclusive": True}))
    world.converge()
    spec = template(world)["spec"]
    (required,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "example.com/nvlink-domain"
    assert required["labelSelector"]["matchLabels"] == {"serving.largemodel.io/name": "smollm2",
                                                        "serving.largemodel.io/group": "0"}
    (anti,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "example.com/nvlink-domain"
    assert anti["labelSelector"]["matchExpressions"] == [
        {"key": LABEL_GROUP_KEY, "operator": "Exists"},
        {"key": LABEL_GROUP_KEY, "operator": "NotIn", "values": ["smollm2-g0"]}]
    assert template(world)["metadata"]["labels"][LABEL_GROUP_KEY] == "smollm2-g0"
    world2 = World(example_lm(placement={"topologyKey": "example.com/rack"}))
    world2.converge()
    assert "podAntiAffinity" not in template(world2)["spec"]["affinity"]
    with pytest.raises(ValueError, match="placement.exclusive needs placement.topologyKey"):
        api.LargeModel.from_manifest(example_lm(placement={"exclusive": True}))


# -- fit before scheduling ------------------------------------------------------------------------

def node(name: str, gpus: int, zone: str = "z1", ready: bool = True, taints: list[Any] | None = None,
         **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, **labels}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": "64", "nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]}}


def big_lm(**placement: Any) -> dict[str, Any]:
    body = example_lm(parallelism={"tensor": 3, "pipeline": 2}, gpu={"perNode": 8}, placement=placement)
    return body


def test_schedulable_counts_groups_and_explains_what_does_not_fit() -> None:
    world = World(big_lm(topologyKey="topology.kubernetes.io/zone"))
    assert cond_after_step(world)["status"] == "Unknown"  # no Node information yet
    world.nodes = [node("a", 5, "z1"), node("b", 2, "z1"), node("c", 3, "z2"),
                   node("d", 8, "z3", taints=[{"key": "gpu", "value": "x", "effect": "NoSchedule"}]),
                   node("e", 8, "z4", ready=False)]
    schedulable = cond_after_step(world)
    assert schedulable["status"] == "False" and schedulable["reason"] == "InsufficientCapacity"
    assert schedulable["message"] == (
        "1 of 1 waiting group(s) do not fit: needs 2 node(s) with 3 free nvidia.com/gpu in one "
        "topology.kubernetes.io/zone; largest free domain has 1 (3 of 5 node(s) eligible; excluded: 1 not Ready or "
        "cordoned, 1 untolerated taint)")
    world.edit(placement={"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    schedulable = cond_after_step(world)
    assert schedulable["status"] == "True" and schedulable["reason"] == "Fits"
    assert schedulable["message"] == "1 waiting group(s) fit; 0 more group(s) of 2 pod(s) x 3 nvidia.com/gpu fit " \
                                     "in the free capacity now"


def cond_after_step(world: World) -> dict[str, Any]:
    world.step()
    return cond(world, "Schedulable")


def test_placed_groups_use_capacity_and_heartbeats_write_nothing() -> None:
    world = World(big_lm())
    world.nodes = [node("a", 8), node("b", 8)]
    world.bind = lambda pod: "a" if pod.endswith("-0") else "b"
    world.converge()
    schedulable = cond(world, "Schedulable")
    assert schedulable["status"] == "True"
    # 16 GPUs, the group holds 3 on each node: 5 free per node -> one 3-GPU stage each -> 1 more group.
    assert schedulable["message"] == "1 more group(s) of 2 pod(s) x 3 nvidia.com/gpu fit in the free capacity now"
    before = fit.fingerprint([fit.node_facts(n) for n in world.nodes], world.gpu_usage())
    for n in world.nodes:  # the kubelet's heartbeat: nothing fit() reads
        n["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:05:00Z"
    assert fit.fingerprint([fit.node_facts(n) for n in world.nodes], world.gpu_usage()) == before
    assert world.step().writes == 0


def test_exclusive_needs_a_domain_no_other_group_uses() -> None:
    lm = api.LargeModel.from_manifest(big_lm(topologyKey="rack", exclusive=True))
    plan = plan_parallelism(lm.spec)
    nodes = [fit.node_facts(node(n, g, rack=r)) for n, g, r in (("a", 8, "r1"), ("b", 8, "r1"), ("c", 3, "r2"))]
    assert fit.fit(nodes, {}, lm, plan, 1).groups == 1  # r1 holds a group (alone); r2 has one 3-GPU stage
    result = fit.fit(nodes, {"a": {"nvidia.com/gpu": 3}}, lm, plan, 1)
    assert result.groups == 0 and "that no other group uses" in result.message


# -- startup ------------------------------------------------------------------------------------

def test_startup_probe_is_sized_from_weight_bytes_and_load_rate() -> None:
    lm = api.LargeModel.from_manifest(example_lm())
    plan = plan_parallelism(lm.spec)
    container = build_group_statefulset(lm, plan, 0, template_revision(lm, plan))["spec"]["template"]["spec"][
        "containers"][0]
    probe = container["startupProbe"]
    budget = lifecycle.startup_budget_seconds(plan, 200.0, None)
    seconds = plan.weight_gib_per_gpu * 1024**3 / 200e6
    assert budget == pytest.approx(120 + 2 * seconds, abs=1)
    assert probe == {"httpGet": {"path": "/startedz", "port": "metrics"}, "periodSeconds": 10,
                     "failureThreshold": -(-budget // 10)}
    slow = api.LargeModel.from_manifest(example_lm(startup={"loadRateMBps": 10}))
    assert lifecycle.startup_budget_seconds(plan, slow.spec.startup.load_rate_mb_per_second, None) > budget
    fixed = api.LargeModel.from_manifest(example_lm(startup={"timeoutSeconds": 3600}))
    sts = build_group_statefulset(fixed, plan, 0, template_revision(fixed, plan))
    assert sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 360
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["COLLECTIVE_TIMEOUT_SECONDS"] == "120"
    assert template_revision(fixed, plan) != template_revision(lm, plan)  # the probe shapes the pod: groups roll


def _pod_status(world: World, name: str, **status: Any) -> None:
    world.pods[name]["status"] = status


def test_start_phases_scheduling_pulling_loading_joining_ready_and_timings() -> None:
    world = World(example_lm())
    world.step()
    assert world.lm["status"]["groups"][0]["startPhase"] == "Scheduling"
    world.objects[("StatefulSet", "smollm2-g0")]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    world.run_pods(ready=False)
    pods = ("smollm2-g0-0", "smollm2-g0-1")
    for name in pods:
        _pod_status(world, name, phase="Pending", conditions=[{"type": "PodScheduled", "status": "False"}])
    world.step()
    assert world.lm["status"]["groups"][0]["startPhase"] == "Scheduling"
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}
    for name in pods:
        _pod_status(world, name, phase="Pending", conditions=[scheduled],
                    containerStatuses=[{"name": "rank", "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}])
    world.step()
    assert world.lm["status"]["groups"][0]["startPhase"] == "Pulling"
    running = {"running": {"startedAt": "2026-01-01T00:00:30Z"}}
    for name in pods:
        _pod_status(world, name, phase="Running", conditions=[scheduled],
                    containerStatuses=[{"name": "rank", "restartCount": 0, "started": False, "ready": False,
                                        "state": running}])
    world.now = datetime.datetime(2026, 1, 1, 0, 0, 30, tzinfo=datetime.UTC) + datetime.timedelta(seconds=1)
    result = world.step()
    phase = world.lm["status"]["groups"][0]["startPhase"]
    assert phase.startswith("Loading ") and phase.endswith("%")
    assert result.requeue_after == 10  # Loading n% is looked at again
    world.now += datetime.timedelta(seconds=20)
    for name in pods:
        world.pods[name]["status"]["containerStatuses"][0]["started"] = True
    world.step()
    assert world.lm["status"]["groups"][0]["startPhase"] == "Joining"
    loaded_at = world.lm["status"]["groups"][0]["lifecycle"]["loadedAt"]
    world.now += datetime.timedelta(seconds=5)
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": world.now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    for name in pods:
        world.pods[name]["status"]["conditions"] = [scheduled, ready]
        world.pods[name]["status"]["containerStatuses"][0]["ready"] = True
    result = world.step()
    group = world.lm["status"]["groups"][0]
    assert group["startPhase"] == "Ready" and group["lifecycle"]["loadedAt"] == loaded_at
    seconds = group["lifecycle"]["seconds"]
    assert seconds["scheduling"] == 5 and seconds["image"] == 25 and seconds["load"] == 21 and seconds["join"] == 5
    assert seconds["total"] == 56 and group["lifecycle"]["loadRateMBps"] > 0
    assert dict(result.lifecycle) == seconds  # observed into the operator's histograms once
    assert world.step().writes == 0 and world.step().lifecycle == ()


def test_failures_before_the_first_ready_have_their_own_budget() -> None:
    world = World(example_lm(restart={"maxGroupRestarts": 5, "maxStartupRestarts": 2, "backoffSeconds": 0}))
    world.step()
    for attempt in (1, 2):
        world.run_pods(ready=False)
        world.pods["smollm2-g0-0"]["status"]["containerStatuses"][0]["restartCount"] = 1  # killed by the probe
        result = world.step()
        assert result.restarts == 1 and "startup restart" in result.events[0].message
        group = world.lm["status"]["groups"][0]
        assert (group["restarts"], group["startupRestarts"]) == (0, attempt)
        world.step()  # recreate
    world.run_pods(ready=False)
    world.pods["smollm2-g0-1"]["status"]["containerStatuses"][0]["restartCount"] = 1
    result = world.step()
    assert [e.reason for e in result.events] == ["RestartBudgetExhausted"]
    assert "2 startup restarts (before its first Ready)" in result.events[0].message
    assert world.lm["status"]["phase"] == "Degraded"
    # A group that was Ready once spends the crash-loop budget instead.
    world2 = World(example_lm(restart={"maxGroupRestarts": 5, "maxStartupRestarts": 0, "backoffSeconds": 0}))
    world2.converge()
    world2.pods["smollm2-g0-0"]["status"]["containerStatuses"][0].update(
        restartCount=1, lastState={"terminated": {"exitCode": 5}})
    result = world2.step()
    assert result.restarts == 1 and "a collective hung" in result.events[0].message
    assert world2.lm["status"]["groups"][0]["restarts"] == 1


def test_render_shows_the_podgroups_and_placement() -> None:
    from largemodel.operator.cli import render_children

    lm = api.LargeModel.from_manifest(example_lm(replicas=2, placement={"gang": "volcano", "topologyKey": "rack"}))
    kinds = [(c["kind"], c["metadata"]["name"]) for c in render_children(lm)]
    assert ("PodGroup", "smollm2-g0") in kinds and ("PodGroup", "smollm2-g1") in kinds
    assert kinds.index(("PodGroup", "smollm2-g0")) < kinds.index(("StatefulSet", "smollm2-g0"))
    sts = next(c for c in render_children(lm) if c["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGet"]["path"] == "/startedz"
