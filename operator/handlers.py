"""kopf wiring: one daemon per LargeModel runs reconcile passes; child events wake it.

Why a daemon: reconcile is level-based, so what matters is "something changed, look again",
not which handler-cause kopf saw. A per-object daemon serialises passes of one LargeModel,
is resumed for every existing object when the operator restarts, and is stopped when the
object is deleted. Watch events of the LargeModel and of its StatefulSets, Services and pods
(found by the name label) only wake it; the pass itself re-reads everything. Daemons and event
handlers keep no state in the object, so a steady state makes no writes (kopf's finalizer, which
lets a daemon stop before its object goes, is written once per object).

Errors: a transient API error (conflict, throttling, 5xx, connection) raises kopf.TemporaryError
with an exponential delay and kopf runs the daemon again; user errors never get here (they are a
status condition, see reconcile.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from largemodel import metrics
from largemodel.operator import api, fit
from largemodel.operator.actions import Event
from largemodel.operator.builders import LABEL_NAME
from largemodel.operator.kubeclient import ApiError, KubeClient
from largemodel.operator.passes import ClusterView, run_pass

log = logging.getLogger(__name__)

FINALIZER = "serving.largemodel.io/operator"
# status.groups[].state -> the `state` label of largemodel_operator_groups.
_GAUGE_STATE = {
    "Ready": metrics.GROUP_READY, "Starting": metrics.GROUP_PROGRESSING, "Updating": metrics.GROUP_PROGRESSING,
    "Pending": metrics.GROUP_PROGRESSING, "Restarting": metrics.GROUP_RESTARTING,
    "Terminating": metrics.GROUP_RESTARTING, "Down": metrics.GROUP_FAILED,
}


@dataclass(frozen=True)
class OperatorConfig:
    """Knobs `largemodel operator` sets from its flags (tests set them directly)."""

    field_manager: str = "largemodel-operator"
    resync_seconds: float = 300.0  # look again even without events (a safety net, not the mechanism)
    batch_window: float = 0.05  # coalesce bursts of child events into one pass
    max_retry_delay: float = 60.0


@dataclass
class _Runtime:
    config: OperatorConfig = field(default_factory=OperatorConfig)
    connection: kopf.ConnectionInfo | None = None
    client: KubeClient | None = None
    client_for: kopf.ConnectionInfo | None = None  # the credentials the client was built with
    settings: kopf.OperatorSettings | None = None
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    group_states: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    # Issue 17: the Node and GPU-use caches fit() reads (operator/fit.py), fed by watches.
    nodes: dict[str, fit.NodeFacts] | None = None
    pod_usage: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)  # pod uid -> (node, GPUs)
    fit_fingerprint: int = 0


_rt = _Runtime()


def configure(config: OperatorConfig) -> None:
    """Set the operator's knobs (before kopf starts)."""
    _rt.config = config


async def _client() -> KubeClient:
    if _rt.connection is None:
        raise kopf.TemporaryError("no API credentials yet", delay=1)
    if _rt.client is None or _rt.client_for is not _rt.connection:
        if _rt.client is not None:
            await _rt.client.close()
        _rt.client = KubeClient(_rt.connection, _rt.config.field_manager)
        _rt.client_for = _rt.connection
    return _rt.client


def _relogin() -> None:
    # Service account tokens rotate: on a 401 read the credentials again (the next pass rebuilds
    # the client) instead of retrying forever with an expired token.
    if _rt.settings is not None:
        try:
            _load_credentials(_rt.settings)
        except kopf.LoginError as err:
            log.warning("re-login failed error=%s", err)


def _wake(namespace: str | None, name: str | None) -> None:
    if namespace and name and (wake := _rt.wakeups.get((namespace, name))) is not None:
        wake.set()


def _post_event(body: dict[str, Any], event: Event) -> None:
    kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)


def _publish_group_states() -> None:
    totals = dict.fromkeys(metrics.GROUP_STATES, 0)
    for states in _rt.group_states.values():
        for state, count in states.items():
            totals[_GAUGE_STATE.get(state, metrics.GROUP_PROGRESSING)] += count
    for state, count in totals.items():
        metrics.OPERATOR_GROUPS.labels(state=state).set(count)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf settings: one operator replica, no cluster scanning, Events under our own name."""
    config = _rt.config
    _rt.settings = settings
    # Fresh per-run state: tests run several operators one after another in one process.
    _rt.wakeups.clear()
    _rt.failures.clear()
    _rt.group_states.clear()
    _rt.nodes, _rt.pod_usage, _rt.fit_fingerprint = None, {}, 0
    settings.peering.standalone = True  # one replica (Recreate strategy); no peering objects or RBAC
    settings.scanning.disabled = True  # never list CRDs or namespaces cluster-wide
    settings.persistence.finalizer = FINALIZER
    settings.posting.enabled = True
    settings.posting.reporting_component = config.field_manager
    settings.posting.level = logging.WARNING  # kopf's own INFO logs are not Events; ours go via kopf.event
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    # Only our children and their pods: the API server filters, so other workloads cost nothing.
    for plural in ("statefulsets", "services", "pods", "networkpolicies"):
        settings.watching.label_selectors[plural] = LABEL_NAME
    settings.watching.client_timeout = 330
    log.info("operator starting field_manager=%s resync_seconds=%s", config.field_manager, config.resync_seconds)


def _load_credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig (KUBECONFIG or ~/.kube/config)")
    _rt.connection = info
    return info


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """In-cluster service account, else kubeconfig; the reconcile client uses the same credentials."""
    return _load_credentials(settings)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    """Close the reconcile client."""
    if _rt.client is not None:
        await _rt.client.close()
        _rt.client = _rt.client_for = None


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def model_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    """A LargeModel changed: wake its daemon."""
    _wake(namespace, name)


@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_NAME: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={LABEL_NAME: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_NAME: kopf.PRESENT})
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels={LABEL_NAME: kopf.PRESENT})
async def child_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    """A child or pod of a LargeModel changed: wake the owner's daemon."""
    _wake(namespace, labels.get(LABEL_NAME))


def _cluster_view() -> ClusterView:
    usage: dict[str, dict[str, int]] = {}
    for node, requests in _rt.pod_usage.values():
        totals = usage.setdefault(node, {})
        for resource, count in requests.items():
            totals[resource] = totals.get(resource, 0) + count
    return ClusterView(nodes=None if _rt.nodes is None else tuple(_rt.nodes.values()), gpu_usage=usage)


def _fit_facts_changed() -> None:
    """Wake every daemon when what fit() reads changed; node heartbeats change nothing and wake none."""
    view = _cluster_view()
    current = fit.fingerprint(view.nodes or (), view.gpu_usage) if view.nodes is not None else 0
    if current != _rt.fit_fingerprint:
        _rt.fit_fingerprint = current
        for wake in list(_rt.wakeups.values()):
            wake.set()


@kopf.on.event("", "v1", "nodes")
async def node_changed(name: str | None, body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    """Keep the Node facts cache (allocatable GPUs, labels, taints, Ready) for the Schedulable condition."""
    if _rt.nodes is None:
        _rt.nodes = {}
    if not name:
        return
    if type == "DELETED":
        _rt.nodes.pop(name, None)
    else:
        _rt.nodes[name] = fit.node_facts(cast(Mapping[str, Any], body))
    _fit_facts_changed()


@kopf.on.event("", "v1", "pods", labels={LABEL_NAME: kopf.PRESENT})
async def pod_usage_changed(uid: str | None, body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    """Keep the GPUs each watched rank pod holds on its node."""
    if not uid:
        return
    usage = None if type == "DELETED" else fit.pod_gpu_usage(cast(Mapping[str, Any], body))
    if usage is None:
        _rt.pod_usage.pop(uid, None)
    else:
        _rt.pod_usage[uid] = usage
    _fit_facts_changed()


async def _sleep_until_woken(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.daemon(api.GROUP, api.VERSION, api.PLURAL, cancellation_timeout=10.0, backoff=5.0)
async def largemodel_daemon(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Reconcile one LargeModel whenever it or its children change, until it is deleted."""
    assert namespace is not None  # LargeModel is namespaced
    key = (namespace, name)
    wake = _rt.wakeups.setdefault(key, asyncio.Event())
    config = _rt.config
    try:
        while not stopped:
            wake.clear()
            try:
                result = await run_pass(await _client(), namespace, name, _post_event, _cluster_view())
            except ApiError as err:
                if err.status == 401:
                    _relogin()
                failures = _rt.failures[key] = _rt.failures.get(key, 0) + 1
                metrics.OPERATOR_RECONCILES.labels(result="retry" if err.transient else "error").inc()
                delay = min(0.5 * 2 ** (failures - 1), config.max_retry_delay)
                log.warning("reconcile failed namespace=%s name=%s attempt=%d retry_in=%.1fs error=%s",
                            namespace, name, failures, delay, err)
                raise kopf.TemporaryError(str(err), delay=delay) from err
            _rt.failures.pop(key, None)
            metrics.OPERATOR_RECONCILES.labels(result="ok").inc()
            if result is None:
                return  # deleted between the event and the read
            _rt.group_states[key] = result.group_states
            _publish_group_states()
            timeout = min(result.requeue_after or config.resync_seconds, config.resync_seconds)
            await _sleep_until_woken(wake, stopped, timeout)
            await asyncio.sleep(config.batch_window)
    finally:
        if _rt.wakeups.get(key) is wake and stopped:
            _rt.wakeups.pop(key, None)
            _rt.group_states.pop(key, None)
            _publish_group_states()
