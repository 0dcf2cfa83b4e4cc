"""Fit before scheduling: how many rank groups the free GPUs of the cluster hold now, and why not (pure).

The operator keeps a cache of the facts of every Node that matter here (allocatable extended
resources, labels, taints, cordoned or not Ready), fed by a watch (handlers.py), and of the GPUs
its own rank pods hold on each node. `fit()` answers, for one LargeModel's plan and placement:
how many more whole groups (pp pods of tp GPUs) fit in the free capacity, and for a group that
does not, a sentence that says what it needs and what the cluster has. The answer is a pure
function of the cache, so the `Schedulable` condition only changes when those facts change: node
heartbeats, which change nothing here, never wake a pass (see `fingerprint`).

What counts as used: GPUs requested by the rank pods the operator watches (every LargeModel in
its namespaces) that are bound to a node and not finished. Other workloads' GPU pods are not seen:
on a shared cluster keep LLM serving on its own node pool (spec.placement.nodeSelector and
tolerations), which is what this counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from largemodel.operator import api
from largemodel.operator.planner import Plan

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class NodeFacts:
    """What fit() needs of one Node."""

    name: str
    allocatable: tuple[tuple[str, int], ...]  # integer resources only (extended resources are integers)
    labels: tuple[tuple[str, str], ...]
    taints: tuple[tuple[str, str, str], ...]  # (key, value, effect)
    schedulable: bool  # Ready and not cordoned

    def resource(self, name: str) -> int:
        """Allocatable count of resource `name` (0 if the node has none)."""
        return dict(self.allocatable).get(name, 0)

    def label(self, key: str) -> str | None:
        """Value of label `key` (None if absent)."""
        return dict(self.labels).get(key)


def _int_quantity(value: Any) -> int | None:
    text = str(value)
    return int(text) if text.isdigit() else None


def node_facts(node: Obj) -> NodeFacts:
    """The facts of a Node object as the API server returns it."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    allocatable = []
    for key, value in (status.get("allocatable") or {}).items():
        count = _int_quantity(value)
        if count is not None and "/" in key:  # extended resources (nvidia.com/gpu, amd.com/gpu, ...)
            allocatable.append((str(key), count))
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    taints = tuple(sorted((str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
                          for t in spec.get("taints") or []))
    return NodeFacts(
        name=str(meta.get("name", "")),
        allocatable=tuple(sorted(allocatable)),
        labels=tuple(sorted((str(k), str(v)) for k, v in (meta.get("labels") or {}).items())),
        taints=taints,
        schedulable=ready and not spec.get("unschedulable", False),
    )


def pod_gpu_usage(pod: Obj) -> tuple[str, dict[str, int]] | None:
    """(node, extended resources requested) of a bound, unfinished pod; None otherwise."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    node = spec.get("nodeName")
    if not node or status.get("phase") in ("Succeeded", "Failed") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    used: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for key, value in ((container.get("resources") or {}).get("requests") or {}).items():
            count = _int_quantity(value)
            if count is not None and "/" in key:
                used[key] = used.get(key, 0) + count
    return (str(node), used) if used else None


def fingerprint(nodes: Iterable[NodeFacts], usage: Mapping[str, Mapping[str, int]]) -> int:
    """A hash of everything fit() reads: when it does not change, no Schedulable condition can."""
    return hash((tuple(sorted(nodes, key=lambda n: n.name)),
                 tuple(sorted((n, tuple(sorted(u.items()))) for n, u in usage.items() if u))))


def _tolerated(taint: tuple[str, str, str], tolerations: Sequence[api.Toleration]) -> bool:
    key, value, effect = taint
    if effect == "PreferNoSchedule":
        return True
    for tol in tolerations:
        if tol.effect and tol.effect != effect:
            continue
        if not tol.key and tol.operator == "Exists":
            return True
        if tol.key == key and (tol.operator == "Exists" or (tol.value or "") == value):
            return True
    return False


@dataclass(frozen=True)
class Fit:
    """How many more groups fit now, and the sentence the condition shows."""

    groups: int
    message: str


def fit(nodes: Sequence[NodeFacts], usage: Mapping[str, Mapping[str, int]], lm: api.LargeModel, plan: Plan,
        waiting: int) -> Fit:
    """Groups of `plan` that fit in the free capacity of `nodes`; `waiting` groups are not placed yet."""
    placement, resource = lm.spec.placement, lm.spec.gpu.resource
    tp, pp = plan.tp, plan.pp
    topology = placement.topology_key
    skipped = {"not Ready or cordoned": 0, "nodeSelector": 0, "untolerated taint": 0, f"no {resource}": 0}
    if topology:
        skipped[f"no {topology} label"] = 0
    slots: dict[str, int] = {}  # domain (node name without topologyKey) -> stages of tp GPUs it has free
    occupied: set[str] = set()  # domains where a rank pod already holds GPUs (exclusive)
    for node in sorted(nodes, key=lambda n: n.name):
        labels = dict(node.labels)
        if not node.schedulable:
            skipped["not Ready or cordoned"] += 1
        elif any(labels.get(k) != v for k, v in placement.node_selector.items()):
            skipped["nodeSelector"] += 1
        elif not all(_tolerated(t, placement.tolerations) for t in node.taints):
            skipped["untolerated taint"] += 1
        elif node.resource(resource) <= 0:
            skipped[f"no {resource}"] += 1
        elif topology and topology not in labels:
            skipped[f"no {topology} label"] += 1
        else:
            used = dict(usage.get(node.name) or {}).get(resource, 0)
            domain = labels[topology] if topology else node.name
            slots[domain] = slots.get(domain, 0) + max(0, node.resource(resource) - used) // tp
            if used:
                occupied.add(domain)
    eligible = len(nodes) - sum(skipped.values())
    if topology and placement.exclusive:
        groups = sum(1 for d, s in slots.items() if s >= pp and d not in occupied)
    elif topology:
        groups = sum(s // pp for s in slots.values())
    else:
        groups = sum(slots.values()) // pp
    shape = f"{pp} pod(s) x {tp} {resource}"
    if waiting <= groups:
        more = groups - waiting
        head = f"{waiting} waiting group(s) fit; " if waiting else ""
        return Fit(groups, f"{head}{more} more group(s) of {shape} fit in the free capacity now")
    nodes_needed = f"needs {pp} node(s) with {tp} free {resource}" if tp > 0 else ""
    if topology:
        free = [s for d, s in slots.items() if not (placement.exclusive and d in occupied)]
        largest = max(free, default=0)
        where = f" in one {topology}" + (" that no other group uses" if placement.exclusive else "")
        have = f"largest free domain has {largest}"
    else:
        where, have = "", f"the cluster has {sum(slots.values())}"
    excluded = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
    detail = f" ({eligible} of {len(nodes)} node(s) eligible" + (f"; excluded: {excluded}" if excluded else "") + ")"
    return Fit(groups, f"{waiting - groups} of {waiting} waiting group(s) do not fit: {nodes_needed}{where}; "
                       f"{have}{detail}")
