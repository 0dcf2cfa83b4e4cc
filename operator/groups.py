"""What the operator sees of one rank group: its StatefulSet, its pods, and whether it is broken.

A group is one StatefulSet `NAME-g<i>` with pp pods. Collectives cannot lose a rank, so the group
is broken as soon as any pod of it failed, restarted a container, is being deleted, or was
replaced. "Replaced" needs memory of which pods the group started with: once all pp pods exist
the operator writes their uids into the StatefulSet annotation MEMBERS_ANNOTATION (one write per
group incarnation); a pod whose uid is not a member, or a member that is gone, means a pod was
deleted and the StatefulSet controller made a new one that can never join the old rendezvous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from largemodel.hangcontract import EXIT_HUNG
from largemodel.operator.builders import LABEL_GROUP, LABEL_NAME, LABEL_REVISION, pod_stage

MEMBERS_ANNOTATION = "serving.largemodel.io/members"

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class GroupView:
    """One observed group."""

    index: int
    sts: Obj
    pods: tuple[Obj, ...]
    revision: str
    terminating: bool
    failure: str  # why the group is broken; "" when it is not
    complete: bool  # all pods exist, none broken
    ready: bool  # complete and every pod Ready

    @property
    def uid(self) -> str:
        """uid of the group's StatefulSet."""
        return str(self.sts.get("metadata", {}).get("uid", ""))

    @property
    def members(self) -> str:
        """The recorded member pod uids ("" before the group first became complete)."""
        return str((self.sts.get("metadata", {}).get("annotations") or {}).get(MEMBERS_ANNOTATION, ""))

    def member_value(self) -> str:
        """The MEMBERS_ANNOTATION value for the current pods."""
        return ",".join(sorted(str(p["metadata"].get("uid", "")) for p in self.pods))


def group_index(obj: Obj) -> int | None:
    """The group index label of a StatefulSet or pod (None if absent or not a number)."""
    value = str((obj.get("metadata", {}).get("labels") or {}).get(LABEL_GROUP, ""))
    return int(value) if value.isdigit() else None


def _owned_by(pod: Obj, uid: str) -> bool:
    owners = pod.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in owners)


def _is_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_problem(pod: Obj) -> str:
    """Why this pod breaks its group ("" if it does not)."""
    meta = pod.get("metadata", {})
    name = meta.get("name", "?")
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return f"pod {name} is being deleted"
    if status.get("phase") == "Failed":
        why = status.get("reason") or status.get("message") or "phase Failed"
        return f"pod {name} failed ({why})"
    for container in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        count = int(container.get("restartCount") or 0)
        if count > 0:
            last = ((container.get("lastState") or {}).get("terminated") or {})
            why = ""
            if last.get("exitCode") is not None:
                why = f", exit code {last['exitCode']}"
                if last["exitCode"] == EXIT_HUNG:
                    why += ": a collective hung (the rank's watchdog named it in the log)"
            return f"pod {name} container {container.get('name', '?')} restarted ({count}x{why})"
    return ""


def _membership_problem(members: str, pods: Sequence[Obj]) -> str:
    if not members:
        return ""
    recorded = set(members.split(","))
    current = {str(p["metadata"].get("uid", "")): str(p["metadata"].get("name", "?")) for p in pods}
    replaced = sorted(name for uid, name in current.items() if uid not in recorded)
    if replaced:
        return f"pod {replaced[0]} was deleted and replaced"
    if recorded - set(current):
        return f"{len(recorded - set(current))} pod(s) of the group were deleted"
    return ""


def observe_group(index: int, sts: Obj, pods: Sequence[Obj]) -> GroupView:
    """Classify one group from its StatefulSet and the pods it owns."""
    meta = sts.get("metadata", {})
    uid = str(meta.get("uid", ""))
    mine = tuple(p for p in pods if _owned_by(p, uid)) if uid else tuple(pods)
    size = int((sts.get("spec") or {}).get("replicas") or 0)
    revision = str((meta.get("labels") or {}).get(LABEL_REVISION, ""))
    terminating = bool(meta.get("deletionTimestamp"))
    failure = ""
    if not terminating:
        failure = next((problem for problem in map(pod_problem, mine) if problem), "")
        members = str((meta.get("annotations") or {}).get(MEMBERS_ANNOTATION, ""))
        failure = failure or _membership_problem(members, mine)
    stages: set[int] = set()
    for pod in mine:
        with contextlib.suppress(ValueError):  # a pod without index label or ordinal counts as no stage
            stages.add(pod_stage(dict(pod)))
    complete = not terminating and not failure and len(mine) == size and stages == set(range(size))
    ready = complete and all(_is_ready(p) for p in mine)
    return GroupView(index, sts, mine, revision, terminating, failure, complete, ready)


def observe_groups(name: str, statefulsets: Sequence[Obj], pods: Sequence[Obj]) -> dict[int, GroupView]:
    """Every group StatefulSet of LargeModel `name`, by index."""
    views: dict[int, GroupView] = {}
    for sts in statefulsets:
        labels = sts.get("metadata", {}).get("labels") or {}
        index = group_index(sts)
        if labels.get(LABEL_NAME) != name or index is None:
            continue
        group_pods = [p for p in pods if group_index(p) == index]
        views[index] = observe_group(index, sts, group_pods)
    return views
