"""Gang scheduling of rank groups: the PodGroup objects and pod labels each scheduler expects (pure).

A group is useless until all its pp pods run, and a partly placed group holds GPUs that another
group could use, so `spec.placement.gang` asks a gang scheduler to place a group's pods all at once
or not at all:

- `scheduler-plugins`: kubernetes-sigs/scheduler-plugins' Coscheduling plugin. One
  `scheduling.x-k8s.io/v1alpha1` PodGroup per group (`NAME-g<i>`, minMember = pp, minResources =
  the group's GPUs, scheduleTimeoutSeconds), pods labelled `scheduling.x-k8s.io/pod-group`, and
  schedulerName `scheduler-plugins-scheduler` (the name its as-a-second-scheduler chart installs).
- `volcano`: one `scheduling.volcano.sh/v1beta1` PodGroup per group (minMember = pp, minResources,
  queue), pods annotated `scheduling.k8s.io/group-name`, schedulerName `volcano`.
- `kueue`: Kueue's plain-pod integration groups pods by the label `kueue.x-k8s.io/pod-group-name`
  with the annotation `kueue.x-k8s.io/pod-group-total-count` and admits the group as one Workload
  from the LocalQueue in `kueue.x-k8s.io/queue-name`. Kueue creates the Workload itself: no object
  of ours, the default scheduler.

PodGroups are children of the LargeModel (ownerReference, name label, group label), created
before their group's StatefulSet, patched back when a field we set drifted, and deleted with
their group (scale-down) or when the gang mode changes. The schemas they must satisfy are vendored
in tests/operator/schemas/ (see the README there for where they come from).
"""

from __future__ import annotations

from typing import Any

from largemodel.operator import api
from largemodel.operator.planner import Plan

SCHEDULER_PLUGINS = "scheduler-plugins"
VOLCANO = "volcano"
KUEUE = "kueue"

SP_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
VOLCANO_API_VERSION = "scheduling.volcano.sh/v1beta1"
PODGROUP_API = {SCHEDULER_PLUGINS: SP_API_VERSION, VOLCANO: VOLCANO_API_VERSION}
DEFAULT_SCHEDULER = {SCHEDULER_PLUGINS: "scheduler-plugins-scheduler", VOLCANO: "volcano"}

SP_POD_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def podgroup_api(mode: str) -> str | None:
    """apiVersion of the PodGroup a gang mode needs (None: the mode needs no object of ours)."""
    return PODGROUP_API.get(mode)


def scheduler_name(placement: api.Placement) -> str:
    """The pods' schedulerName ("" = the cluster default)."""
    return placement.scheduler_name or DEFAULT_SCHEDULER.get(placement.gang, "")


def pod_metadata(placement: api.Placement, plan: Plan, group_sts: str) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) the rank pods of group StatefulSet `group_sts` carry for the gang scheduler."""
    mode = placement.gang
    if mode == SCHEDULER_PLUGINS:
        return {SP_POD_GROUP_LABEL: group_sts}, {}
    if mode == VOLCANO:
        return {}, {VOLCANO_GROUP_ANNOTATION: group_sts}
    if mode == KUEUE:
        labels = {KUEUE_POD_GROUP_LABEL: group_sts}
        if placement.queue_name:
            labels[KUEUE_QUEUE_LABEL] = placement.queue_name
        return labels, {KUEUE_TOTAL_COUNT_ANNOTATION: str(plan.pp)}
    return {}, {}


def min_resources(lm: api.LargeModel, plan: Plan) -> dict[str, str]:
    """What the whole group needs before any of it may start: its GPUs."""
    return {lm.spec.gpu.resource: str(plan.tp * plan.pp)}


def build_podgroup(lm: api.LargeModel, plan: Plan, metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The PodGroup of one group (`metadata` built by the caller: name, namespace, labels, owners)."""
    placement = lm.spec.placement
    api_version = podgroup_api(placement.gang)
    if api_version is None:
        return None
    spec: dict[str, Any] = {"minMember": plan.pp, "minResources": min_resources(lm, plan)}
    if placement.gang == SCHEDULER_PLUGINS:
        spec["scheduleTimeoutSeconds"] = placement.schedule_timeout_seconds
    else:
        spec["queue"] = placement.queue_name or "default"
    return {"apiVersion": api_version, "kind": "PodGroup", "metadata": metadata, "spec": spec}
