"""Run one reconcile pass against the API server: read, decide (reconcile.py), write.

Reads are fresh every pass (the LargeModel and its children by the name label), so a pass never
acts on a stale cache. Writes go in an order that keeps a crash harmless: the restart history
first (guarded by the resourceVersion that was read, so a concurrent edit means a retry), then
deletes, creates and patches of children, then status, then Events.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from largemodel import metrics
from largemodel.operator import api, gang
from largemodel.operator.actions import Create, Delete, Event, Observed, Patch, Result
from largemodel.operator.builders import LABEL_NAME
from largemodel.operator.kubeclient import ApiError, KubeClient, resource_path
from largemodel.operator.reconcile import reconcile

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any], Event], None]


@dataclass(frozen=True)
class ClusterView:
    """What the operator's watches cached about the cluster (handlers.py): Node facts and GPU use."""

    nodes: tuple[Any, ...] | None = None
    gpu_usage: dict[str, dict[str, int]] = field(default_factory=dict)


async def _podgroups(client: KubeClient, namespace: str, selector: str, body: dict[str, Any]) -> list[Any] | None:
    """PodGroups of the gang mode in use (None: its CRD is not served) plus those of the mode used before."""
    spec_mode = str(((body.get("spec") or {}).get("placement") or {}).get("gang") or "none")
    old_mode = str((body.get("status") or {}).get("gang") or "none")
    out: list[Any] | None = []
    for mode in dict.fromkeys((spec_mode, old_mode)):
        version = gang.podgroup_api(mode)
        if version is None:
            continue
        items = await client.list_if_served(resource_path(version, "PodGroup", namespace), selector)
        if items is None and mode == spec_mode:
            return None
        if out is not None:
            out.extend(items or [])
    return out


async def observe(client: KubeClient, namespace: str, name: str, body: dict[str, Any] | None = None,
                  cluster: ClusterView | None = None) -> Observed:
    """List the children of LargeModel `name` (StatefulSets, Services, pods, NetworkPolicies, PodGroups) by
    its name label; Node facts and GPU use come from the watch caches in `cluster`."""
    selector = f"{LABEL_NAME}={name}"
    statefulsets, services, pods, policies, podgroups = await asyncio.gather(
        client.list(resource_path("apps/v1", "StatefulSet", namespace), selector),
        client.list(resource_path("v1", "Service", namespace), selector),
        client.list(resource_path("v1", "Pod", namespace), selector),
        client.list(resource_path("networking.k8s.io/v1", "NetworkPolicy", namespace), selector),
        _podgroups(client, namespace, selector, body or {}),
    )
    cluster = cluster or ClusterView()
    return Observed(statefulsets=statefulsets, services=services, pods=pods, networkpolicies=policies,
                    podgroups=podgroups, nodes=cluster.nodes, gpu_usage=cluster.gpu_usage)


async def execute(client: KubeClient, body: dict[str, Any], result: Result) -> None:
    """Make the writes of `result` for the LargeModel `body`."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    lm_path = resource_path(api.API_VERSION, api.KIND, namespace, name)
    if result.annotations is not None:
        await client.patch(
            lm_path, {"metadata": {"annotations": result.annotations, "resourceVersion": meta.get("resourceVersion")}}
        )
    for action in result.actions:
        if isinstance(action, Delete):
            await client.delete(resource_path(action.api_version, action.kind, namespace, action.name), action.uid)
        elif isinstance(action, Create):
            obj = action.obj
            try:
                await client.create(resource_path(obj["apiVersion"], obj["kind"], namespace), obj)
            except ApiError as err:
                # The group Secret is created blind (the operator may not read Secrets): one that
                # exists already keeps its key, which running groups share.
                if not (obj["kind"] == "Secret" and err.status == 409):
                    raise
        elif isinstance(action, Patch):
            await client.patch(resource_path(action.api_version, action.kind, namespace, action.name), action.patch)
    if result.status is not None:
        await client.patch(lm_path + "/status", {"status": result.status})


async def run_pass(client: KubeClient, namespace: str, name: str, events: EventSink,
                   cluster: ClusterView | None = None) -> Result | None:
    """One pass for LargeModel namespace/name; None when it no longer exists."""
    started = time.monotonic()
    body = await client.get(resource_path(api.API_VERSION, api.KIND, namespace, name))
    if body is None:
        return None
    observed = await observe(client, namespace, name, body, cluster)
    result = reconcile(body, observed, datetime.datetime.now(datetime.UTC))
    await execute(client, body, result)
    for event in result.events:
        events(body, event)
    # The series exists from the first pass at 0, so increase() sees the very first restart too.
    metrics.OPERATOR_GROUP_RESTARTS.labels(namespace=namespace, name=name).inc(result.restarts)
    for phase, seconds in result.lifecycle:  # groups that turned Ready for the first time in this pass
        metrics.OPERATOR_GROUP_START_SECONDS.labels(phase=phase).observe(seconds)
    metrics.OPERATOR_RECONCILE_SECONDS.observe(time.monotonic() - started)
    if result.writes or result.events:
        log.info(
            "reconciled namespace=%s name=%s writes=%d events=%s phase=%s requeue_after=%s",
            namespace, name, result.writes, ",".join(e.reason for e in result.events) or "-",
            (result.status or body.get("status") or {}).get("phase"), result.requeue_after,
        )
    return result
