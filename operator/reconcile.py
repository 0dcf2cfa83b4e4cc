"""One level-based reconcile pass of a LargeModel, as a pure function.

(LargeModel body, observed children and pods, now) -> (writes to make, Events, new status).
Restart history rides in the body's annotations (see restarts.py). Nothing here talks to the
API server; handlers.py runs the result. The rules (docs/DESIGN.md#operator):

- Invalid spec (schema or planner): Admitted=False with the message, an Event, phase Failed, and
  no writes to children: a new resource gets none, an edited one keeps serving what it has.
- Services and the NetworkPolicy are created when missing and patched only when a field we set
  differs; the NetworkPolicy is deleted when spec.serving.networkPolicy turns false.
- The group Secret (the key stage supervisors authenticate each other with) is created with a
  fresh random value in every pass that creates a group StatefulSet, before it; the operator
  cannot read Secrets, so when it exists already the create's AlreadyExists is the answer
  (passes.py) and the existing key stays.
- Group StatefulSets are compared by revision label only (the hash of everything that shapes
  the pod template): the API server fills defaults and normalises quantities, so a field-wise
  diff of a pod template would never settle. A group at another revision is recreated: not-Ready
  ones at once, Ready ones at most rollout.maxUnavailableGroups at a time (counting every group
  that is not Ready), highest index first, the next only after the last is Ready.
- Recreating a group = deleting its StatefulSet with Foreground propagation (its pods go first)
  and creating it again on the pass that sees it gone. The StatefulSet, not just its pods, is
  deleted so that the new incarnation cannot mix with old pods and starts from the new template.
- replicas: missing groups are created, groups at index >= replicas deleted, highest first.
- A broken group (groups.py) is recreated within the restart budget (restarts.py), else left
  down with Degraded=True.
- Status is written only when it differs, so a steady state makes zero writes.
- Issue 17. Gang scheduling: a PodGroup per group (spec.placement.gang scheduler-plugins or
  volcano) is created before its StatefulSet, patched back on drift and deleted with its group or
  when the gang mode changes; a gang mode whose CRD the cluster does not serve is a user error
  (Admitted=False, reason GangUnavailable) and creates nothing. A group that fails before it was
  ever Ready counts against restart.maxStartupRestarts, not the crash-loop budget. Schedulable says
  how many groups fit in the free capacity of the cached Node facts (operator/fit.py) and why a
  waiting one does not. status.groups[] carries each group's startPhase and measured lifecycle
  (operator/lifecycle.py); a group still loading is looked at again every LOADING_REQUEUE_S so
  its Loading n% moves.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from largemodel.operator import api, conditions, fit, gang, lifecycle
from largemodel.operator.actions import Action, Create, Delete, Event, Observed, Patch, Result
from largemodel.operator.api import GroupState
from largemodel.operator.builders import (
    build_client_service,
    build_group_secret,
    build_group_statefulset,
    build_network_policy,
    build_podgroup,
    build_ranks_service,
    endpoint,
    group_name,
    selector_labels,
    template_revision,
    weight_bytes_per_gpu,
)
from largemodel.operator.conditions import Cond
from largemodel.operator.groups import MEMBERS_ANNOTATION, GroupView, group_index, observe_groups
from largemodel.operator.manifest import describe_validation_error
from largemodel.operator.planner import Plan, PlanError, plan_parallelism
from largemodel.operator.restarts import (
    RESTARTS_ANNOTATION,
    RestartHistory,
    decide_restart,
    dump_history,
    in_window,
    load_history,
    may_start,
)

Obj = Mapping[str, Any]
LOADING_REQUEUE_S = 10.0

__all__ = ["Action", "Create", "Delete", "Event", "Observed", "Patch", "Result", "admit", "reconcile"]


def admit(body: Obj) -> tuple[api.LargeModel | None, Plan | None, str]:
    """Parse and plan the resource: (model, plan, "") or (model or None, None, why not)."""
    try:
        lm = api.LargeModel.from_manifest({k: v for k, v in body.items() if k != "status"})
    except pydantic.ValidationError as err:
        return None, None, "invalid LargeModel: " + describe_validation_error(err)
    try:
        return lm, plan_parallelism(lm.spec), ""
    except PlanError as err:
        return lm, None, str(err)


def _contains(observed: Any, desired: Any) -> bool:
    """Whether every field set in `desired` has the same value in `observed` (defaults ignored)."""
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(_contains(observed.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(_contains(o, d) for o, d in zip(observed, desired, strict=True))
        )
    return bool(observed == desired)


def _service_actions(desired: dict[str, Any], observed: Sequence[Obj]) -> tuple[list[Action], list[Event]]:
    """Create a Service or NetworkPolicy when missing; patch back the fields we set when they drifted."""
    name, kind = desired["metadata"]["name"], desired["kind"]
    current = next((s for s in observed if s.get("metadata", {}).get("name") == name), None)
    if current is None:
        return [Create(desired)], [Event("Normal", f"Created{kind}", f"Created {kind} {name}")]
    owned = {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]}
    if "ownerReferences" in desired["metadata"]:
        owned["metadata"]["ownerReferences"] = desired["metadata"]["ownerReferences"]
    if _contains(current, owned):
        return [], []
    return [Patch(desired["apiVersion"], kind, name, owned)], [Event("Normal", f"Updated{kind}", f"Updated {kind} {name}")]


def _network_policy_actions(lm: api.LargeModel, observed: Sequence[Obj]) -> tuple[list[Action], list[Event]]:
    if lm.spec.serving.network_policy:
        return _service_actions(build_network_policy(lm), observed)
    stale = [o for o in observed if o.get("metadata", {}).get("name") == lm.metadata.name]
    return ([Delete("networking.k8s.io/v1", "NetworkPolicy", lm.metadata.name, o["metadata"].get("uid", ""))
             for o in stale],
            [Event("Normal", "DeletedNetworkPolicy", f"Deleted NetworkPolicy {lm.metadata.name}")] if stale else [])


def _ensure_group_secret(p: _Pass) -> None:
    """Put a create of the group Secret before the first group StatefulSet created in this pass."""
    first = next((i for i, a in enumerate(p.actions)
                  if isinstance(a, Create) and a.obj.get("kind") == "StatefulSet"), None)
    if first is not None:
        p.actions.insert(first, Create(build_group_secret(p.lm, secrets.token_hex(32))))


def _delete_group(view: GroupView) -> Delete:
    return Delete("apps/v1", "StatefulSet", str(view.sts["metadata"]["name"]), view.uid)


@dataclass
class _Pass:
    """Mutable scratch of one pass (kept local to `reconcile`)."""

    lm: api.LargeModel
    now: float
    history: RestartHistory
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    states: dict[int, GroupState] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    restarts: int = 0
    down: list[int] = field(default_factory=list)
    old_groups: dict[int, Obj] = field(default_factory=dict)  # status.groups of the last pass, by index
    lifecycle_events: list[tuple[str, float]] = field(default_factory=list)

    def warn(self, reason: str, message: str) -> None:
        self.events.append(Event("Warning", reason, message))

    def info(self, reason: str, message: str) -> None:
        self.events.append(Event("Normal", reason, message))


def _was_ready(p: _Pass, view: GroupView) -> bool:
    """Whether the group was ever Ready at this revision (status.groups[].readyOnce remembers): until
    then its failures are startup failures, with their own budget."""
    old = p.old_groups.get(view.index) or {}
    return bool(view.ready or (old.get("readyOnce") and old.get("revision") == view.revision))


def _handle_broken(p: _Pass, view: GroupView) -> None:
    policy = p.lm.spec.restart
    startup = not _was_ready(p, view)
    decision = decide_restart(p.history.get(view.index), view.uid, policy, p.now, startup=startup)
    p.history = p.history.with_group(view.index, decision.record)
    p.actions.append(_delete_group(view))
    budget, used = ((policy.max_startup_restarts, decision.record.startup_times) if startup
                    else (policy.max_group_restarts, decision.record.times))
    kind = "startup restarts (before its first Ready)" if startup else "restarts"
    if not decision.restart:
        p.states[view.index] = GroupState.DOWN
        p.down.append(view.index)
        if decision.counted:
            p.warn(
                "RestartBudgetExhausted",
                f"group g{view.index}: {view.failure}; {budget} {kind} within "
                f"{policy.window_seconds}s used up, leaving the group down",
            )
        return
    p.states[view.index] = GroupState.RESTARTING
    if decision.counted:
        p.restarts += 1
        wait = decision.record.not_before - p.now
        p.warn(
            "GroupFailed",
            f"group g{view.index}: {view.failure}; recreating the whole group "
            f"({kind.split(' (')[0][:-1]} {len(used)}/{budget} in {policy.window_seconds}s, "
            f"starting again in {wait:.0f}s)",
        )


def _start_missing(p: _Pass, index: int, plan: Plan, revision: str) -> None:
    policy = p.lm.spec.restart
    record = p.history.get(index)
    allowed, updated, wait = may_start(record, policy, p.now)
    if updated != record:
        p.history = p.history.with_group(index, updated)
    if not allowed:
        p.states[index] = GroupState.DOWN if record.down else GroupState.RESTARTING
        if record.down:
            p.down.append(index)
        if wait is not None:
            p.waits.append(wait)
        return
    sts = build_group_statefulset(p.lm, plan, index, revision)
    p.actions.append(Create(sts))
    p.states[index] = GroupState.STARTING
    if record.down:  # back from Down once the window let go of old restarts: that is a restart too
        p.restarts += 1
    again = " again" if record.total or record.down else ""
    p.info(
        "CreatedGroup",
        f"Starting group g{index}{again} as StatefulSet {sts['metadata']['name']}: {plan.pp} pod(s) x "
        f"{plan.tp} GPU(s), revision {revision}",
    )


def _roll_out(p: _Pass, views: dict[int, GroupView], revision: str, replicas: int) -> None:
    outdated = [v for i, v in views.items() if i < replicas and not v.terminating and v.revision != revision]
    unavailable = sum(1 for i in range(replicas) if p.states.get(i) != GroupState.READY)
    budget = p.lm.spec.rollout.max_unavailable_groups - unavailable
    for view in sorted(outdated, key=lambda v: -v.index):
        if view.ready:
            if budget <= 0:
                continue
            budget -= 1
        p.actions.append(_delete_group(view))
        p.history = p.history.with_group(view.index, None)
        p.states[view.index] = GroupState.UPDATING
        p.info("RollingGroup", f"Recreating group g{view.index} for revision {revision} (was {view.revision})")


def _groups(p: _Pass, plan: Plan, revision: str, views: dict[int, GroupView]) -> None:
    replicas = p.lm.spec.replicas
    for index in sorted((i for i in views if i >= replicas), reverse=True):
        view = views[index]
        p.history = p.history.with_group(index, None)
        if not view.terminating:
            p.actions.append(_delete_group(view))
            p.info("DeletedGroup", f"Removing group g{index}: spec.replicas is {replicas}")
    for index in range(replicas):
        view = views.get(index)
        if view is None:
            _start_missing(p, index, plan, revision)
        elif view.terminating:
            p.states[index] = GroupState.TERMINATING
        elif view.failure and view.revision == revision:
            _handle_broken(p, view)
        else:
            p.states[index] = GroupState.READY if view.ready else GroupState.STARTING
            if view.complete and not view.members:
                patch = {"metadata": {"annotations": {MEMBERS_ANNOTATION: view.member_value()}}}
                p.actions.append(Patch("apps/v1", "StatefulSet", group_name(p.lm.metadata.name, index), patch))
    _roll_out(p, views, revision, replicas)


def _podgroup_actions(p: _Pass, plan: Plan, views: dict[int, GroupView], observed: Sequence[Obj]) -> None:
    """Create each group's PodGroup before its StatefulSet, patch drift back, delete stale ones."""
    lm, replicas = p.lm, p.lm.spec.replicas
    wanted = gang.podgroup_api(lm.spec.placement.gang)
    existing = {(str(o.get("apiVersion", "")), str(o.get("metadata", {}).get("name", ""))): o for o in observed}
    for index in range(replicas if wanted else 0):
        desired = build_podgroup(lm, plan, index)
        assert desired is not None
        name = desired["metadata"]["name"]
        current = existing.pop((desired["apiVersion"], name), None)
        if current is None:
            p.actions.append(Create(desired))
            p.info("CreatedPodGroup", f"Created {lm.spec.placement.gang} PodGroup {name}: minMember {plan.pp}")
        elif not _contains(current, {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]}):
            p.actions.append(Patch(desired["apiVersion"], "PodGroup", name,
                                   {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]}))
    for (api_version, name), obj in sorted(existing.items()):
        index = group_index(obj)
        if api_version == wanted and index is not None and index in views:
            continue  # its group is still being removed: the PodGroup goes after it
        p.actions.append(Delete(api_version, "PodGroup", name, str(obj.get("metadata", {}).get("uid", ""))))
        p.info("DeletedPodGroup", f"Deleted PodGroup {name}")


def _start_phase(view: GroupView | None, state: str, plan: Plan, expected_load_s: float, now: float) -> str:
    if view is None or view.terminating or state in (GroupState.DOWN, GroupState.RESTARTING, GroupState.UPDATING,
                                                     GroupState.TERMINATING):
        return "Scheduling" if state in (GroupState.STARTING, GroupState.PENDING) else state
    return lifecycle.start_phase(view, plan.pp, now, expected_load_s)


def _group_status(p: _Pass, views: dict[int, GroupView], revision: str, plan: Plan) -> list[dict[str, Any]]:
    out = []
    expected = lifecycle.expected_load_seconds(plan, p.lm.spec.startup.load_rate_mb_per_second)
    for index in range(p.lm.spec.replicas):
        view = views.get(index)
        state = p.states.get(index, GroupState.PENDING)
        record = p.history.get(index)
        entry: dict[str, Any] = {
            "index": index,
            "ready": state == GroupState.READY,
            "restarts": record.total,
            "revision": view.revision if view is not None and state not in (GroupState.UPDATING,) else revision,
            "state": state,
            "startPhase": _start_phase(view, state, plan, expected, p.now),
        }
        old = p.old_groups.get(index) or {}
        if state == GroupState.READY or (old.get("readyOnce") and old.get("revision") == entry["revision"]):
            entry["readyOnce"] = True
        if record.startup_total:
            entry["startupRestarts"] = record.startup_total
        if view is not None and not view.terminating and view.uid:
            previous = (p.old_groups.get(index) or {}).get("lifecycle") or {}
            life = lifecycle.lifecycle(view, previous, p.now, weight_bytes_per_gpu(plan))
            _recovery(life, record)
            entry["lifecycle"] = life
            if life.get("readyAt") and not (previous.get("uid") == view.uid and previous.get("readyAt")):
                p.lifecycle_events.extend(sorted(life.get("seconds", {}).items()))
        out.append(entry)
    return out


def _recovery(life: dict[str, Any], record: Any) -> None:
    """Time to recover: from the group's last restart to this incarnation's Ready."""
    failures = [*record.times, *record.startup_times]
    ready = life.get("readyAt")
    if not failures or not ready:
        return
    ready_ts = datetime.datetime.fromisoformat(str(ready).replace("Z", "+00:00")).timestamp()
    last = max(failures)
    if ready_ts >= last - 1:  # Ready timestamps have one-second resolution
        life.setdefault("seconds", {})["recovery"] = round(max(0.0, ready_ts - last), 3)


def _schedulable(p: _Pass, plan: Plan, views: dict[int, GroupView], observed: Observed) -> Cond:
    """Schedulable: how many groups fit in the free capacity now, and why a waiting one does not."""
    if observed.nodes is None:
        return Cond("Schedulable", None, "NodesUnknown", "no Node information yet (the operator watches Nodes)")
    waiting = 0
    for index in range(p.lm.spec.replicas):
        view, state = views.get(index), p.states.get(index, GroupState.PENDING)
        if state == GroupState.DOWN:
            continue
        if view is None or view.terminating or len(view.pods) < plan.pp or not all(
                (pod.get("spec") or {}).get("nodeName") for pod in view.pods):
            waiting += 1
    result = fit.fit(observed.nodes, observed.gpu_usage, p.lm, plan, waiting)
    ok = result.groups >= waiting
    return Cond("Schedulable", ok, "Fits" if ok else "InsufficientCapacity", result.message)


def _valid_status(
    p: _Pass, plan: Plan, revision: str, views: dict[int, GroupView], old: Obj, now: datetime.datetime,
    observed: Observed,
) -> tuple[dict[str, Any], list[Event]]:
    lm, replicas = p.lm, p.lm.spec.replicas
    ready = sum(1 for i in range(replicas) if p.states.get(i) == GroupState.READY)
    current = sum(
        1 for i in range(replicas) if p.states.get(i) == GroupState.READY and views[i].revision == revision
    )
    extra = any(i >= replicas for i in views)
    done = current == replicas and not extra
    outdated = any(v.revision != revision for i, v in views.items() if i < replicas)
    restarting = any(s in (GroupState.RESTARTING, GroupState.TERMINATING) for s in p.states.values())
    reason = (
        "RestartBudgetExhausted" if p.down and not outdated else "Restarting" if restarting
        else "RollingOut" if outdated else "Scaling" if extra else "Creating"
    )
    progress = f"{current}/{replicas} groups ready at revision {revision}"
    admitted = f"tp={plan.tp} pp={plan.pp}: {plan.gpus_per_group} GPUs per group, {replicas} group(s)"
    conds = [
        Cond("Admitted", True, "Planned", admitted),
        Cond("Progressing", not done and reason != "RestartBudgetExhausted", "Complete" if done else reason, progress),
        Cond("Ready", ready == replicas, "GroupsReady" if ready == replicas else "GroupsNotReady",
             f"{ready}/{replicas} groups ready"),
        Cond("Degraded", bool(p.down), "RestartBudgetExhausted" if p.down else "AsExpected",
             f"group(s) {', '.join(f'g{i}' for i in sorted(set(p.down)))} left down after exhausting "
             "the restart budget" if p.down else "no group is left down"),
        _schedulable(p, plan, views, observed),
    ]
    old_conds = old.get("conditions") or []
    events = []
    if conditions.flipped(old_conds, "Admitted", True):
        events.append(Event("Normal", "Planned", admitted))
    if replicas and conditions.flipped(old_conds, "Ready", True) and ready == replicas:
        events.append(Event("Normal", "Ready", f"all {replicas} group(s) ready"))
    any_group = (bool(views) or bool(p.history.groups)
                 or any(isinstance(a, Create) and a.obj.get("kind") == "StatefulSet" for a in p.actions))
    phase = (
        "Degraded" if p.down else "Ready" if done else "Deploying" if any_group or not replicas else "Pending"
    )
    status = {
        "phase": phase,
        "observedGeneration": lm.metadata.generation,
        "conditions": conditions.render(old_conds, conds, lm.metadata.generation, now),
        "plan": plan.to_status().model_dump(mode="json", by_alias=True),
        "replicas": sum(1 for v in views.values() if not v.terminating),
        "readyReplicas": ready,
        "selector": ",".join(f"{k}={v}" for k, v in selector_labels(lm).items()),
        "groups": _group_status(p, views, revision, plan),
        "endpoint": endpoint(lm),
        "revision": revision,
    }
    if lm.spec.placement.gang != "none":
        status["gang"] = lm.spec.placement.gang  # which PodGroups exist: a later pass lists them to clean up
    return _as_status(status), events


def _invalid(body: Obj, why: str, observed: Observed, now: datetime.datetime,
             reason: str = "InvalidSpec") -> tuple[dict[str, Any], list[Event]]:
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    old = body.get("status") or {}
    old_conds = old.get("conditions") or []
    views = observe_groups(str(meta.get("name", "")), observed.statefulsets, observed.pods)
    ready = sum(1 for v in views.values() if v.ready)
    conds = [
        Cond("Admitted", False, reason, why),
        Cond("Progressing", False, reason, "fix the spec; nothing is created or changed until then"),
        Cond("Ready", bool(views) and ready == len(views), "LastValidSpec" if views else reason,
             f"{ready}/{len(views)} groups of the last valid spec ready"),
        Cond("Degraded", False, "AsExpected", "no group is left down"),
    ]
    status = {
        **{k: v for k, v in old.items() if k in ("plan", "selector", "endpoint", "revision", "groups", "gang")},
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": conditions.render(old_conds, conds, generation, now),
        "replicas": sum(1 for v in views.values() if not v.terminating),
        "readyReplicas": ready,
    }
    events = [Event("Warning", reason, why)] if conditions.flipped(old_conds, "Admitted", False, why) else []
    return _as_status(status), events


def _as_status(status: dict[str, Any]) -> dict[str, Any]:
    """`status` built through api.LargeModelStatus: a field the CRD's schema lacks (which the API
    server would prune, making every pass differ from what is stored) fails here, in tests, instead
    of on a cluster. Only the keys given come out, as JSON values (GroupState -> its string)."""
    return api.LargeModelStatus.model_validate(status).model_dump(mode="json", by_alias=True, exclude_unset=True)


def _changed(old: Obj, new: dict[str, Any]) -> dict[str, Any] | None:
    """The status merge patch: the whole new status, keys we no longer set removed; None if equal."""
    stale = {k: None for k in old if k not in new}
    if not stale and all(old.get(k) == v for k, v in new.items()):
        return None
    return {**new, **stale}


def reconcile(body: Obj, observed: Observed, now: datetime.datetime) -> Result:
    """Decide one pass for the LargeModel `body` given its observed children at time `now`."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Result()  # garbage collection removes the children; nothing to decide
    old_status = body.get("status") or {}
    lm, plan, why = admit(body)
    if lm is None or plan is None:
        status, events = _invalid(body, why, observed, now)
        return Result(events=tuple(events), status=_changed(old_status, status))

    mode = lm.spec.placement.gang
    needed = gang.podgroup_api(mode)
    if needed is not None and observed.podgroups is None:
        why = (f"spec.placement.gang={mode} needs PodGroup {needed}, which this cluster does not serve: "
               f"install {'kubernetes-sigs/scheduler-plugins (Coscheduling)' if mode == gang.SCHEDULER_PLUGINS else 'Volcano'}"
               " or choose another gang mode (docs/CLUSTER.md)")
        status, events = _invalid(body, why, observed, now, reason="GangUnavailable")
        return Result(events=tuple(events), status=_changed(old_status, status))
    revision = template_revision(lm, plan)
    annotations = meta.get("annotations") or {}
    p = _Pass(lm=lm, now=now.timestamp(), history=load_history(annotations, revision))
    p.old_groups = {int(g["index"]): g for g in old_status.get("groups") or [] if isinstance(g, Mapping) and "index" in g}
    for desired in (build_ranks_service(lm), build_client_service(lm)):
        actions, events = _service_actions(desired, observed.services)
        p.actions.extend(actions)
        p.events.extend(events)
    actions, events = _network_policy_actions(lm, observed.networkpolicies)
    p.actions.extend(actions)
    p.events.extend(events)
    views = observe_groups(lm.metadata.name, observed.statefulsets, observed.pods)
    _podgroup_actions(p, plan, views, observed.podgroups or ())
    _groups(p, plan, revision, views)
    _ensure_group_secret(p)
    status, events = _valid_status(p, plan, revision, views, old_status, now, observed)

    stored = dump_history(p.history) if p.history.groups else None
    annotation_patch = None if annotations.get(RESTARTS_ANNOTATION) == stored else {RESTARTS_ANNOTATION: stored}
    states: dict[str, int] = {}
    for state in p.states.values():
        states[state] = states.get(state, 0) + 1
    waits = [w for w in p.waits if w > 0]
    if any(str(g.get("startPhase", "")).startswith("Loading") for g in status.get("groups") or []):
        waits.append(LOADING_REQUEUE_S)  # Loading n% is an estimate that moves with time
    for index in p.down:  # a group left down comes back when its oldest restart leaves the window
        recent = in_window(p.history.get(index), lm.spec.restart, p.now)
        if recent:
            waits.append(min(recent) + lm.spec.restart.window_seconds - p.now)
    return Result(
        actions=tuple(p.actions),
        events=tuple([*p.events, *events]),
        status=_changed(old_status, status),
        annotations=annotation_patch,
        requeue_after=min(waits) if waits else None,
        group_states=states,
        restarts=p.restarts,
        lifecycle=tuple(p.lifecycle_events),
    )
