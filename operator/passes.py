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
from typing import Any

from largemodel import metrics
from largemodel.operator import api
from largemodel.operator.actions import Create, Delete, Event, Observed, Patch, Result
from largemodel.operator.builders import LABEL_NAME
from largemodel.operator.kubeclient import ApiError, KubeClient, resource_path
from largemodel.operator.reconcile import reconcile

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any], Event], None]


async def observe(client: KubeClient, namespace: str, name: str) -> Observed:
    """List the children of LargeModel `name` (StatefulSets, Services, pods, NetworkPolicies) by its name label."""
    selector = f"{LABEL_NAME}={name}"
    statefulsets, services, pods, policies = await asyncio.gather(
        client.list(resource_path("apps/v1", "StatefulSet", namespace), selector),
        client.list(resource_path("v1", "Service", namespace), selector),
        client.list(resource_path("v1", "Pod", namespace), selector),
        client.list(resource_path("networking.k8s.io/v1", "NetworkPolicy", namespace), selector),
    )
    return Observed(statefulsets=statefulsets, services=services, pods=pods, networkpolicies=policies)


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


async def run_pass(client: KubeClient, namespace: str, name: str, events: EventSink) -> Result | None:
    """One pass for LargeModel namespace/name; None when it no longer exists."""
    started = time.monotonic()
    body = await client.get(resource_path(api.API_VERSION, api.KIND, namespace, name))
    if body is None:
        return None
    observed = await observe(client, namespace, name)
    result = reconcile(body, observed, datetime.datetime.now(datetime.UTC))
    await execute(client, body, result)
    for event in result.events:
        events(body, event)
    # The series exists from the first pass at 0, so increase() sees the very first restart too.
    metrics.OPERATOR_GROUP_RESTARTS.labels(namespace=namespace, name=name).inc(result.restarts)
    metrics.OPERATOR_RECONCILE_SECONDS.observe(time.monotonic() - started)
    if result.writes or result.events:
        log.info(
            "reconciled namespace=%s name=%s writes=%d events=%s phase=%s requeue_after=%s",
            namespace, name, result.writes, ",".join(e.reason for e in result.events) or "-",
            (result.status or body.get("status") or {}).get("phase"), result.requeue_after,
        )
    return result
