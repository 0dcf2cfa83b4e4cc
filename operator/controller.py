"""The operator's state and loops, without kopf's decorators: what handlers.py wires to kopf.

- the reconcile client and its credentials (rebuilt when kopf logs in again, e.g. a rotated
  service account token after a 401);
- one wake-up event per LargeModel, set by watch events of the object and its children;
- the Node and GPU-use caches the Schedulable condition reads (operator/fit.py), which wake every
  daemon only when what fit() reads changed (a Node heartbeat changes nothing and wakes none);
- the daemon loop: a pass, then sleep until woken or the resync period, coalescing bursts;
  transient API errors back off exponentially through kopf.TemporaryError;
- the largemodel_operator_groups gauge, summed over every LargeModel's group states.

Tests drive a Controller directly with a fake pass and fake stop flag (tests/operator/test_controller.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf

from largemodel import metrics
from largemodel.operator import fit
from largemodel.operator.actions import Result
from largemodel.operator.api import GroupState
from largemodel.operator.kubeclient import ApiError, KubeClient
from largemodel.operator.passes import ClusterView, EventSink, run_pass

log = logging.getLogger(__name__)

# status.groups[].state -> the `state` label of largemodel_operator_groups.
GAUGE_STATE = {
    GroupState.READY: metrics.GROUP_READY, GroupState.STARTING: metrics.GROUP_PROGRESSING,
    GroupState.UPDATING: metrics.GROUP_PROGRESSING, GroupState.PENDING: metrics.GROUP_PROGRESSING,
    GroupState.RESTARTING: metrics.GROUP_RESTARTING, GroupState.TERMINATING: metrics.GROUP_RESTARTING,
    GroupState.DOWN: metrics.GROUP_FAILED,
}

PassFn = Callable[[KubeClient, str, str, EventSink, ClusterView], Awaitable[Result | None]]


@dataclass(frozen=True)
class OperatorConfig:
    """Knobs `largemodel operator` sets from its flags (tests set them directly)."""

    field_manager: str = "largemodel-operator"
    resync_seconds: float = 300.0  # look again even without events (a safety net, not the mechanism)
    batch_window: float = 0.05  # coalesce bursts of child events into one pass
    max_retry_delay: float = 60.0


class Stopped(Protocol):
    """What the daemon loop needs of kopf.DaemonStopped: truthy once stopping, and awaitable."""

    def __bool__(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


class Controller:
    """Everything the kopf handlers share, for one operator run."""

    def __init__(self, config: OperatorConfig | None = None) -> None:
        self.config = config or OperatorConfig()
        self.relogin: Callable[[], None] | None = None  # set by handlers: read the credentials again
        self.connection: kopf.ConnectionInfo | None = None
        self.client: KubeClient | None = None
        self.client_for: kopf.ConnectionInfo | None = None  # the credentials the client was built with
        self.reset()

    def reset(self) -> None:
        """Fresh per-run state (tests run several operators one after another in one process)."""
        self.wakeups: dict[tuple[str, str], asyncio.Event] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.group_states: dict[tuple[str, str], dict[str, int]] = {}
        self.nodes: dict[str, fit.NodeFacts] | None = None  # None until the Node watch reports
        self.pod_usage: dict[str, tuple[str, dict[str, int]]] = {}  # pod uid -> (node, GPUs it requests)
        self.fit_fingerprint = 0

    # ---- the reconcile client --------------------------------------------------------------

    async def get_client(self) -> KubeClient:
        """The client for the current credentials, rebuilt when they changed."""
        if self.connection is None:
            raise kopf.TemporaryError("no API credentials yet", delay=1)
        if self.client is None or self.client_for is not self.connection:
            if self.client is not None:
                await self.client.close()
            self.client = KubeClient(self.connection, self.config.field_manager)
            self.client_for = self.connection
        return self.client

    async def close(self) -> None:
        """Close the reconcile client."""
        if self.client is not None:
            await self.client.close()
            self.client = self.client_for = None

    # ---- watches ---------------------------------------------------------------------------

    def wake(self, namespace: str | None, name: str | None) -> None:
        """Something about LargeModel namespace/name changed: its daemon looks again."""
        if namespace and name and (event := self.wakeups.get((namespace, name))) is not None:
            event.set()

    def node_event(self, name: str | None, body: Mapping[str, Any], kind: str | None) -> None:
        """A Node watch event (kind: kopf's ADDED/MODIFIED/DELETED, or None for the initial listing)."""
        if self.nodes is None:
            self.nodes = {}
        if not name:
            return
        if kind == "DELETED":
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = fit.node_facts(body)
        self._fit_facts_changed()

    def pod_event(self, uid: str | None, body: Mapping[str, Any], kind: str | None) -> None:
        """A rank pod watch event: keep the GPUs it holds on its node."""
        if not uid:
            return
        usage = None if kind == "DELETED" else fit.pod_gpu_usage(body)
        if usage is None:
            self.pod_usage.pop(uid, None)
        else:
            self.pod_usage[uid] = usage
        self._fit_facts_changed()

    def cluster_view(self) -> ClusterView:
        """The cached Node facts and the GPUs in use per node, for one pass."""
        usage: dict[str, dict[str, int]] = {}
        for node, requests in self.pod_usage.values():
            totals = usage.setdefault(node, {})
            for resource, count in requests.items():
                totals[resource] = totals.get(resource, 0) + count
        return ClusterView(nodes=None if self.nodes is None else tuple(self.nodes.values()), gpu_usage=usage)

    def _fit_facts_changed(self) -> None:
        view = self.cluster_view()
        current = fit.fingerprint(view.nodes or (), view.gpu_usage) if view.nodes is not None else 0
        if current != self.fit_fingerprint:
            self.fit_fingerprint = current
            for event in list(self.wakeups.values()):
                event.set()

    # ---- the daemon loop -------------------------------------------------------------------

    def publish_group_states(self) -> None:
        """Set largemodel_operator_groups from every LargeModel's last pass."""
        totals = dict.fromkeys(metrics.GROUP_STATES, 0)
        for states in self.group_states.values():
            for state, count in states.items():
                totals[GAUGE_STATE[GroupState(state)]] += count
        for state, count in totals.items():
            metrics.OPERATOR_GROUPS.labels(state=state).set(count)

    async def run_daemon(self, namespace: str, name: str, stopped: Stopped, post_event: EventSink,
                         one_pass: PassFn = run_pass) -> None:
        """Reconcile one LargeModel whenever it or its children change, until stopped or deleted."""
        key = (namespace, name)
        wake = self.wakeups.setdefault(key, asyncio.Event())
        config = self.config
        try:
            while not stopped:
                wake.clear()
                try:
                    result = await one_pass(await self.get_client(), namespace, name, post_event, self.cluster_view())
                except ApiError as err:
                    raise self._retry(key, err) from err
                self.failures.pop(key, None)
                metrics.OPERATOR_RECONCILES.labels(result="ok").inc()
                if result is None:
                    return  # deleted between the event and the read
                self.group_states[key] = result.group_states
                self.publish_group_states()
                timeout = min(result.requeue_after or config.resync_seconds, config.resync_seconds)
                await _sleep_until_woken(wake, stopped, timeout)
                await asyncio.sleep(config.batch_window)
        finally:
            if self.wakeups.get(key) is wake and stopped:
                self.wakeups.pop(key, None)
                self.group_states.pop(key, None)
                self.publish_group_states()

    def _retry(self, key: tuple[str, str], err: ApiError) -> kopf.TemporaryError:
        """kopf runs the daemon again after an exponential delay; a 401 reads the credentials again."""
        if err.status == 401 and self.relogin is not None:
            self.relogin()
        failures = self.failures[key] = self.failures.get(key, 0) + 1
        metrics.OPERATOR_RECONCILES.labels(result="retry" if err.transient else "error").inc()
        delay = min(0.5 * 2 ** (failures - 1), self.config.max_retry_delay)
        log.warning("reconcile failed namespace=%s name=%s attempt=%d retry_in=%.1fs error=%s",
                    key[0], key[1], failures, delay, err)
        return kopf.TemporaryError(str(err), delay=delay)


async def _sleep_until_woken(wake: asyncio.Event, stopped: Stopped, timeout: float) -> None:
    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
