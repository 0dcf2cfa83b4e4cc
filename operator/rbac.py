"""The exact Kubernetes API permissions the operator uses, as data.

The Helm chart grants exactly RULES (its test compares them), and the operator's end-to-end
tests record every request the operator makes to the mock API server and fail if one falls
outside RULES. Namespaced installs grant them with a Role per watched namespace, cluster-wide
installs with a ClusterRole. Nothing is ever updated with PUT: every write is a create, a JSON
merge patch or a delete.
"""

from __future__ import annotations

from typing import Any

from largemodel.operator import api

RULES: list[dict[str, Any]] = [
    # get: each reconcile pass reads the LargeModel fresh. list/watch: kopf's watch stream that
    # starts a daemon per LargeModel and wakes it. patch: kopf adds/removes its finalizer (so a
    # daemon stops before its object goes) and the operator writes the restart-history annotation.
    {"apiGroups": [api.GROUP], "resources": [api.PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    # patch: status is written once per pass, only when it changed.
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["patch"]},
    # update on finalizers: never called directly, but every child carries an ownerReference with
    # blockOwnerDeletion=true, and clusters that enforce owner-reference permissions
    # (OwnerReferencesPermissionEnforcement, e.g. OpenShift) require it of whoever sets that flag.
    {"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/finalizers"], "verbs": ["update"]},
    # list/watch: observe the group StatefulSets (by name label) and wake on their changes.
    # create: start a group. patch: record the group's member pods once. delete: recreate a broken
    # or outdated group, remove groups on scale-down.
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    # list/watch: the ranks and client Services; create when missing, patch back a drifted field.
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "patch"]},
    # list/watch: pod health decides group health (failed, restarted, deleted, Ready). Pods are
    # never written: a group is recreated by deleting its StatefulSet.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    # create: an Event for every decision a user would want to see (kopf posts them).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # create only: the group Secret (the key a group's stage supervisors authenticate with) is
    # created before a group starts; the operator never reads, lists or changes a Secret
    # (AlreadyExists means it is there), and garbage collection deletes it with its LargeModel.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    # list/watch: the LargeModel's NetworkPolicy; create when missing, patch back drift, delete
    # when spec.serving.networkPolicy turns false.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["list", "watch", "create", "patch", "delete"]},
    # Gang scheduling (issue 17), only the PodGroups of the two schedulers that have one. list: each
    # pass reads the LargeModel's PodGroups by name label (a 404 means the CRD is not installed: a
    # GangUnavailable condition). create: one per group before its StatefulSet. patch: drift back.
    # delete: with its group on scale-down, or all of them when spec.placement.gang changes. Never
    # watched: a pass runs on every change of the group's pods anyway.
    {"apiGroups": ["scheduling.x-k8s.io"], "resources": ["podgroups"], "verbs": ["list", "create", "patch", "delete"]},
    {"apiGroups": ["scheduling.volcano.sh"], "resources": ["podgroups"],
     "verbs": ["list", "create", "patch", "delete"]},
]

# Cluster-scoped, so granted by a ClusterRole even for a namespaced install (issue 17): list/watch
# Nodes feed the fit cache behind the Schedulable condition (allocatable GPUs, labels, taints, Ready).
# Nodes are never written.
CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
]


def allowed(group: str, resource: str, verb: str) -> bool:
    """Whether RULES grant `verb` on `resource` (plural, optionally "/subresource") in `group`."""
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in [*RULES, *CLUSTER_RULES]
    )


def role(name: str, namespace: str | None = None) -> dict[str, Any]:
    """A Role (namespaced) or ClusterRole (namespace None) granting exactly RULES (a cluster-wide
    install also needs CLUSTER_RULES in its ClusterRole: `cluster_role()`)."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole" if namespace is None else "Role",
        "metadata": meta,
        "rules": [{k: list(v) for k, v in rule.items()} for rule in RULES],
    }


def cluster_role(name: str, namespaced_install: bool) -> dict[str, Any]:
    """The ClusterRole of an install: RULES + CLUSTER_RULES cluster-wide, only CLUSTER_RULES for a namespaced one."""
    rules = CLUSTER_RULES if namespaced_install else [*RULES, *CLUSTER_RULES]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{k: list(v) for k, v in rule.items()} for rule in rules],
    }
