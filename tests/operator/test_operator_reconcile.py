"""The pure reconcile function, decision by decision (tables), and a few multi-pass walks."""

from __future__ import annotations

import datetime
import json

import pytest

from largemodel import envcontract
from largemodel.operator.builders import POD_INDEX_LABEL
from largemodel.operator.conditions import find
from largemodel.operator.groups import MEMBERS_ANNOTATION
from largemodel.operator.reconcile import Create, Delete, Observed, Patch, reconcile
from largemodel.operator.restarts import RESTARTS_ANNOTATION
from tests.support.memworld import World, example_lm


def _kinds(result) -> list[tuple[str, str, str]]:
    """The writes of a pass, the group Secret's blind create left out (test_group_secret_* covers it)."""
    out = []
    for a in result.actions:
        if isinstance(a, Create) and a.obj["kind"] == "Secret":
            continue
        if isinstance(a, Create):
            out.append(("create", a.obj["kind"], a.obj["metadata"]["name"]))
        elif isinstance(a, Patch):
            out.append(("patch", a.kind, a.name))
        elif isinstance(a, Delete):
            out.append(("delete", a.kind, a.name))
    return out


def _cond(status: dict, kind: str) -> tuple[str, str]:
    cond = find(status["conditions"], kind)
    assert cond is not None
    return cond["status"], cond["reason"]


def test_new_model_creates_services_and_groups() -> None:
    world = World(example_lm(replicas=2))
    result = world.step()
    assert _kinds(result) == [
        ("create", "Service", "smollm2-ranks"), ("create", "Service", "smollm2"),
        ("create", "NetworkPolicy", "smollm2"),
        ("create", "StatefulSet", "smollm2-g0"), ("create", "StatefulSet", "smollm2-g1"),
    ]
    status = result.status
    assert status["phase"] == "Deploying" and status["observedGeneration"] == 1
    assert _cond(status, "Admitted") == ("True", "Planned")
    assert _cond(status, "Progressing") == ("True", "Creating")
    assert status["plan"]["tensor"] == 1 and status["plan"]["pipeline"] == 2
    assert status["selector"] == "serving.largemodel.io/name=smollm2"
    assert status["endpoint"] == "http://smollm2.models.svc:8000/v1"
    assert {e.reason for e in result.events} == {"CreatedService", "CreatedNetworkPolicy", "CreatedGroup", "Planned"}


@pytest.mark.parametrize(
    ("spec", "message_part"),
    [
        ({"parallelism": {"tensor": 2}}, "valid tensor sizes"),
        ({"parallelism": {"pipeline": 31}}, "pipeline"),
        ({"gpu": {"memoryGiB": 0.1}}, ""),
        ({"bogus": 1}, "spec.bogus"),
        ({"replicas": -1}, "spec.replicas"),
    ],
)
def test_invalid_spec_is_not_admitted_and_creates_nothing(spec: dict, message_part: str) -> None:
    result = reconcile(example_lm(**spec), Observed(), datetime.datetime.now(datetime.UTC))
    assert result.actions == ()
    status = result.status
    assert status["phase"] == "Failed"
    admitted = find(status["conditions"], "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "InvalidSpec"
    assert message_part in admitted["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "InvalidSpec")]
    assert admitted["message"] == result.events[0].message


def test_invalid_event_only_on_transition_and_fix_recovers() -> None:
    world = World(example_lm(parallelism={"tensor": 2}))
    assert world.step().events and world.step().events == () and world.last.writes == 0
    world.edit(parallelism={"tensor": 1})
    world.converge()
    assert world.groups() == ["smollm2-g0"]
    assert world.lm["status"]["phase"] == "Ready"
    assert _cond(world.lm["status"], "Admitted") == ("True", "Planned")


def test_steady_state_makes_zero_writes_and_keeps_transition_times() -> None:
    world = World(example_lm(replicas=2))
    world.converge()
    status = world.lm["status"]
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2 and status["replicas"] == 2
    assert _cond(status, "Ready") == ("True", "GroupsReady") and _cond(status, "Progressing")[0] == "False"
    before = json.dumps(status, sort_keys=True)
    world.now += datetime.timedelta(hours=1)
    result = world.step()
    assert result.writes == 0 and result.events == () and result.requeue_after is None
    assert json.dumps(world.lm["status"], sort_keys=True) == before
    # Members were recorded once per group, as a StatefulSet annotation.
    for name in world.groups():
        assert world.objects[("StatefulSet", name)]["metadata"]["annotations"][MEMBERS_ANNOTATION]


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (lambda pod: pod["status"]["containerStatuses"][0].update(restartCount=1), "restarted"),
        (lambda pod: pod["status"].update(phase="Failed", reason="OOMKilled"), "OOMKilled"),
        (lambda pod: pod["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z"), "being deleted"),
        (lambda pod: pod["metadata"].update(uid="uid-replacement"), "deleted and replaced"),
    ],
)
def test_broken_pod_recreates_the_whole_group(fault, why: str) -> None:
    world = World(example_lm(restart={"maxGroupRestarts": 3, "backoffSeconds": 10}))
    world.converge()
    fault(world.pods["smollm2-g0-1"])
    result = world.step()
    assert _kinds(result) == [("delete", "StatefulSet", "smollm2-g0")]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "GroupFailed")]
    assert why in result.events[0].message
    assert result.restarts == 1 and result.requeue_after is None
    history = json.loads(world.lm["metadata"]["annotations"][RESTARTS_ANNOTATION])
    assert history["groups"]["0"]["total"] == 1
    assert world.lm["status"]["groups"][0]["state"] == "Restarting"
    # Backoff: the group stays down for backoffSeconds, then starts again.
    waiting = world.step()
    assert waiting.actions == () and waiting.requeue_after == pytest.approx(10)
    world.now += datetime.timedelta(seconds=10)
    assert _kinds(world.step()) == [("create", "StatefulSet", "smollm2-g0")]
    world.run_pods()
    world.converge()
    group = world.lm["status"]["groups"][0]
    assert {k: group[k] for k in ("index", "ready", "restarts", "revision", "state", "startPhase")} == {
        "index": 0, "ready": True, "restarts": 1, "revision": world.lm["status"]["revision"], "state": "Ready",
        "startPhase": "Ready",
    }
    assert group["lifecycle"]["seconds"]["recovery"] == 10  # from the restart to Ready again (issue 17)


def test_member_deleted_but_not_yet_replaced_is_a_failure() -> None:
    world = World(example_lm())
    world.converge()
    del world.pods["smollm2-g0-0"]
    assert _kinds(world.step()) == [("delete", "StatefulSet", "smollm2-g0")]


def test_crash_loop_exhausts_budget_then_degraded() -> None:
    world = World(example_lm(restart={"maxGroupRestarts": 2, "windowSeconds": 600, "backoffSeconds": 1}))
    world.converge()
    waits = []
    for _ in range(2):
        world.pods["smollm2-g0-0"]["status"]["containerStatuses"][0]["restartCount"] = 1
        assert world.step().restarts == 1
        waits.append(world.step().requeue_after)
        world.now += datetime.timedelta(seconds=waits[-1])
        world.step()
        world.run_pods()
    assert waits == [1, 2]  # exponential backoff
    world.pods["smollm2-g0-0"]["status"]["containerStatuses"][0]["restartCount"] = 1
    result = world.step()
    assert _kinds(result) == [("delete", "StatefulSet", "smollm2-g0")]
    assert [e.reason for e in result.events] == ["RestartBudgetExhausted"]
    status = world.lm["status"]
    assert status["phase"] == "Degraded" and _cond(status, "Degraded") == ("True", "RestartBudgetExhausted")
    assert status["groups"][0]["state"] == "Down"
    # Down stays down (no writes, no events) until the oldest restart leaves the window.
    assert world.step().status["replicas"] == 0  # the pass that sees the StatefulSet gone
    idle = world.step()
    assert idle.writes == 0 and idle.events == () and 0 < idle.requeue_after <= 600
    world.now += datetime.timedelta(seconds=idle.requeue_after)
    back = world.step()
    assert _kinds(back) == [("create", "StatefulSet", "smollm2-g0")] and back.restarts == 1
    world.converge()
    assert world.lm["status"]["phase"] == "Ready" and _cond(world.lm["status"], "Degraded")[0] == "False"


def test_repeated_pass_counts_a_restart_once() -> None:
    world = World(example_lm())
    world.converge()
    world.pods["smollm2-g0-0"]["status"]["phase"] = "Failed"
    first = reconcile(world.lm, world.observed(), world.now)
    world.lm["metadata"].setdefault("annotations", {}).update(first.annotations)  # annotation landed, delete did not
    again = reconcile(world.lm, world.observed(), world.now)
    assert _kinds(again) == [("delete", "StatefulSet", "smollm2-g0")]
    assert again.annotations is None and again.restarts == 0 and again.events == ()


def test_scale_up_and_down_whole_groups_highest_first() -> None:
    world = World(example_lm(replicas=1))
    world.converge()
    world.edit(replicas=3)
    assert _kinds(world.step()) == [("create", "StatefulSet", "smollm2-g1"), ("create", "StatefulSet", "smollm2-g2")]
    world.converge()
    assert world.lm["status"]["readyReplicas"] == 3
    world.edit(replicas=1)
    result = world.step()
    assert _kinds(result) == [("delete", "StatefulSet", "smollm2-g2"), ("delete", "StatefulSet", "smollm2-g1")]
    world.converge()
    assert world.groups() == ["smollm2-g0"] and world.lm["status"]["replicas"] == 1


def test_rollout_respects_max_unavailable() -> None:
    world = World(example_lm(replicas=3))
    world.converge()
    old_revision = world.lm["status"]["revision"]
    world.edit(image="largemodel-runtime:0.2.0")
    result = world.step()
    assert _kinds(result) == [("delete", "StatefulSet", "smollm2-g2")]
    assert _cond(world.lm["status"], "Progressing") == ("True", "RollingOut")
    order = []
    for _ in range(12):  # recreate, wait for Ready, next
        result = world.step()
        order += [name for verb, _, name in _kinds(result) if verb == "delete"]
        down = [g for g in world.lm["status"]["groups"] if g["state"] != "Ready"]
        assert len(down) <= 1
        world.run_pods()
    assert order == ["smollm2-g1", "smollm2-g0"]
    world.converge()
    revisions = {o["metadata"]["labels"]["serving.largemodel.io/revision"] for o in world.objects.values()
                 if o["kind"] == "StatefulSet"}
    assert revisions == {world.lm["status"]["revision"]} and old_revision not in revisions


def test_rollout_waits_while_another_group_is_not_ready() -> None:
    world = World(example_lm(replicas=2, rollout={"maxUnavailableGroups": 1}))
    world.converge()
    world.pods["smollm2-g0-0"]["status"]["conditions"][0]["status"] = "False"  # g0 not Ready (not broken)
    world.edit(image="largemodel-runtime:0.2.0")
    # g0 is outdated and not Ready: recreating it costs no availability; g1 (Ready) must wait.
    assert _kinds(world.step()) == [("delete", "StatefulSet", "smollm2-g0")]


def test_service_drift_is_patched_back() -> None:
    world = World(example_lm())
    world.converge()
    world.objects[("Service", "smollm2")]["spec"]["ports"][0]["port"] = 1234
    world.objects[("Service", "smollm2")]["spec"]["clusterIP"] = "10.0.0.1"  # server default: ignored
    assert _kinds(world.step()) == [("patch", "Service", "smollm2")]
    assert world.step().writes == 0


def test_deleting_model_is_left_to_garbage_collection() -> None:
    body = example_lm()
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert reconcile(body, Observed(), datetime.datetime.now(datetime.UTC)).writes == 0


def test_restart_history_resets_on_new_revision() -> None:
    world = World(example_lm(restart={"maxGroupRestarts": 1, "backoffSeconds": 0}))
    world.converge()
    world.pods["smollm2-g0-0"]["status"]["phase"] = "Failed"
    world.converge()
    world.pods["smollm2-g0-0"]["status"]["phase"] = "Failed"
    world.step()
    assert world.lm["status"]["phase"] == "Degraded"
    world.edit(image="largemodel-runtime:0.2.0")  # the user ships a fix
    world.converge()
    assert world.lm["status"]["phase"] == "Ready" and world.groups() == ["smollm2-g0"]


def test_bad_edit_keeps_serving_the_last_valid_spec() -> None:
    world = World(example_lm(replicas=2))
    world.converge()
    world.edit(parallelism={"tensor": 2})
    result = world.step()
    assert result.actions == () and [e.reason for e in result.events] == ["InvalidSpec"]
    status = world.lm["status"]
    assert status["phase"] == "Failed" and _cond(status, "Admitted") == ("False", "InvalidSpec")
    assert _cond(status, "Ready") == ("True", "LastValidSpec") and status["readyReplicas"] == 2
    assert world.groups() == ["smollm2-g0", "smollm2-g1"]
    assert world.step().writes == 0


def test_rollout_two_at_a_time() -> None:
    world = World(example_lm(replicas=4, rollout={"maxUnavailableGroups": 2}))
    world.converge()
    world.edit(image="largemodel-runtime:0.2.0")
    assert _kinds(world.step()) == [("delete", "StatefulSet", "smollm2-g3"), ("delete", "StatefulSet", "smollm2-g2")]
    creates = world.step()  # the two come back at the new revision; g1, g0 wait for them
    assert _kinds(creates) == [("create", "StatefulSet", "smollm2-g2"), ("create", "StatefulSet", "smollm2-g3")]
    assert _kinds(world.step()) == []  # no pods yet: nothing else may go down
    world.run_pods()
    # The pass that sees g2 and g3 Ready records their members and takes down the next two.
    assert _kinds(world.step()) == [
        ("patch", "StatefulSet", "smollm2-g2"), ("patch", "StatefulSet", "smollm2-g3"),
        ("delete", "StatefulSet", "smollm2-g1"), ("delete", "StatefulSet", "smollm2-g0"),
    ]


def test_group_secret_is_created_before_every_group_start_and_never_read() -> None:
    world = World(example_lm(replicas=2))
    first = world.step()
    creates = [a.obj for a in first.actions if isinstance(a, Create)]
    kinds = [o["kind"] for o in creates]
    assert kinds.count("Secret") == 1 and kinds.index("Secret") < kinds.index("StatefulSet")
    secret = creates[kinds.index("Secret")]
    assert secret["metadata"]["name"] == "smollm2-group-secret"
    assert len(secret["stringData"]["secret"]) == 64 and secret["metadata"]["ownerReferences"]
    # Every pod mounts it and names the file; rank ports bind the pod IP.
    sts = creates[kinds.index("StatefulSet")]
    pod = sts["spec"]["template"]["spec"]
    assert {"name": "group-secret", "secret": {"secretName": "smollm2-group-secret", "defaultMode": 0o440}} in pod["volumes"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["GROUP_SECRET_FILE"]["value"] == "/var/run/largemodel/group/secret"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # A steady state writes nothing, the Secret included.
    world.converge()
    assert world.step().writes == 0
    # A fresh key per pass that starts a group: the API server keeps the first (AlreadyExists).
    again = reconcile(world.lm, Observed(), world.now)
    assert [a.obj["kind"] for a in again.actions if isinstance(a, Create)].count("Secret") == 1


def test_network_policy_admits_rank_ports_from_own_pods_and_api_from_allow_from() -> None:
    world = World(example_lm())
    world.lm["spec"]["serving"]["allowFrom"] = [{"namespaceSelector": {"team": "web"}}, {"cidr": "10.0.0.0/8"}]
    world.converge()
    policy = world.objects[("NetworkPolicy", "smollm2")]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"serving.largemodel.io/name": "smollm2"}}
    own, api_rule, metrics_rule = policy["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"serving.largemodel.io/name": "smollm2"}}}]}
    assert {p["port"] for p in api_rule["ports"]} == {8000, 9000}
    assert api_rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert metrics_rule == {"ports": [{"protocol": "TCP", "port": 9100}]}
    world.edit(serving={"networkPolicy": False})
    assert ("delete", "NetworkPolicy", "smollm2") in _kinds(world.step())


def test_scale_down_drains_the_removed_groups_through_their_pods_grace() -> None:
    """Scale-down deletes the highest groups' StatefulSets only; their pods, SIGTERMed, drain for
    serving.drainSeconds (stage 0 leaves the client Service and stops admitting, the other stages wait
    for its SHUTDOWN) inside a termination grace period that covers drain plus shutdown."""
    world = World(example_lm(replicas=3, serving={"drainSeconds": 300}))
    world.converge()
    templates = {name: obj["spec"]["template"]["spec"] for (kind, name), obj in world.objects.items()
                 if kind == "StatefulSet"}
    assert len(templates) == 3
    for spec in templates.values():
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[envcontract.DRAIN_GRACE_SECONDS] == "300"
        assert spec["terminationGracePeriodSeconds"] == 300 + envcontract.SHUTDOWN_MARGIN_SECONDS
    (service,) = [obj for (kind, name), obj in world.objects.items() if kind == "Service" and
                  name == "smollm2"]
    assert service["spec"]["selector"][POD_INDEX_LABEL] == "0"  # only stage-0 pods take requests
    world.edit(replicas=1)
    result = world.step()
    assert _kinds(result) == [("delete", "StatefulSet", "smollm2-g2"), ("delete", "StatefulSet", "smollm2-g1")]
    # The group that stays is neither patched nor recreated.
    assert all(getattr(a, "name", "") != "smollm2-g0" for a in result.actions)


def test_drain_seconds_default_and_grace() -> None:
    world = World(example_lm(replicas=1))
    world.converge()
    (spec,) = [obj["spec"]["template"]["spec"] for (kind, _), obj in world.objects.items()
               if kind == "StatefulSet"]
    assert spec["terminationGracePeriodSeconds"] == envcontract.termination_grace_seconds(
        envcontract.DEFAULT_DRAIN_SECONDS) == 60
