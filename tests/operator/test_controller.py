"""The operator's daemon loop, client lifecycle and watch caches, driven without kopf (operator/controller.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from largemodel import metrics
from largemodel.operator.actions import Result
from largemodel.operator.controller import Controller, OperatorConfig
from largemodel.operator.kubeclient import ApiError
from largemodel.operator.passes import ClusterView


class Stop:
    """kopf.DaemonStopped's shape: truthy once set, awaitable."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True


class FakePasses:
    """Stands in for run_pass: records each call, returns the next scripted outcome."""

    def __init__(self, *outcomes: Result | None | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[ClusterView] = []
        self.called = asyncio.Event()

    async def __call__(self, client: Any, namespace: str, name: str, events: Any, view: ClusterView) -> Result | None:
        self.calls.append(view)
        self.called.set()
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def controller(**config: Any) -> Controller:
    made = Controller(OperatorConfig(resync_seconds=60, batch_window=0.0, **config))
    made.connection = object()  # type: ignore[assignment]  # credentials as kopf hands them over

    async def fake_client() -> Any:
        return "client"

    made.get_client = fake_client  # type: ignore[method-assign]
    return made


def groups_gauge(state: str) -> float:
    return metrics.OPERATOR_GROUPS.labels(state=state)._value.get()


async def _wait_calls(passes: FakePasses, count: int) -> None:
    async with asyncio.timeout(5):
        while len(passes.calls) < count:
            passes.called.clear()
            await passes.called.wait()


def test_a_wake_runs_one_more_pass_and_a_stop_forgets_the_model() -> None:
    async def scenario() -> None:
        ctl, stop = controller(), Stop()
        passes = FakePasses(Result(group_states={"Ready": 2, "Restarting": 1}))
        daemon = asyncio.create_task(ctl.run_daemon("ns", "m", stop, lambda body, event: None, passes))
        await _wait_calls(passes, 1)
        assert groups_gauge(metrics.GROUP_READY) == 2 and groups_gauge(metrics.GROUP_RESTARTING) == 1
        await asyncio.sleep(0.05)
        assert len(passes.calls) == 1  # nothing changed: it sleeps (the resync is 60 s)
        ctl.wake("ns", "m")
        ctl.wake("ns", "other")  # another model's event wakes nobody here
        await _wait_calls(passes, 2)
        stop.event.set()
        ctl.wake("ns", "m")
        async with asyncio.timeout(5):
            await daemon
        assert ("ns", "m") not in ctl.wakeups and groups_gauge(metrics.GROUP_READY) == 0

    asyncio.run(scenario())


def test_requeue_after_bounds_the_sleep_and_a_deleted_model_ends_the_daemon() -> None:
    async def scenario() -> None:
        ctl, stop = controller(), Stop()
        passes = FakePasses(Result(requeue_after=0.05), Result(requeue_after=0.05), None)
        async with asyncio.timeout(5):
            await ctl.run_daemon("ns", "m", stop, lambda body, event: None, passes)
        assert len(passes.calls) == 3  # two timed re-looks, then the object was gone

    asyncio.run(scenario())


def test_api_errors_back_off_exponentially_and_a_401_logs_in_again() -> None:
    async def scenario() -> None:
        ctl, stop = controller(max_retry_delay=1.5), Stop()
        relogins: list[int] = []
        ctl.relogin = lambda: relogins.append(1)
        conflict = ApiError(409, "Conflict", "changed", "patch statefulsets")
        delays = []
        for _ in range(4):
            with pytest.raises(kopf.TemporaryError) as raised:
                await ctl.run_daemon("ns", "m", stop, lambda body, event: None, FakePasses(conflict))
            delays.append(raised.value.delay)
        assert delays == [0.5, 1.0, 1.5, 1.5] and not relogins  # capped at max_retry_delay
        with pytest.raises(kopf.TemporaryError):
            await ctl.run_daemon("ns", "m", stop, lambda body, event: None,
                                 FakePasses(ApiError(401, "Unauthorized", "token expired", "get largemodels")))
        assert relogins == [1]
        stop.event.set()
        await ctl.run_daemon("ns", "m", stop, lambda body, event: None, FakePasses(Result()))
        assert ("ns", "m") not in ctl.failures or ctl.failures[("ns", "m")] == 5

    asyncio.run(scenario())


def _node(name: str, gpus: int, heartbeat: str = "t0") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"zone": "a"}, "annotations": {"beat": heartbeat}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "8"},
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]}}


def _pod(node: str, gpus: int, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"nodeName": node, "containers": [
        {"resources": {"requests": {"nvidia.com/gpu": str(gpus)}}}]}, "status": {"phase": phase}}


def test_watch_caches_wake_daemons_only_when_fit_facts_change() -> None:
    ctl = Controller()
    woken = ctl.wakeups.setdefault(("ns", "m"), asyncio.Event())
    assert ctl.cluster_view().nodes is None  # no Node watch yet: fit says nothing
    ctl.node_event("n1", _node("n1", 8), "ADDED")
    assert woken.is_set() and [n.name for n in ctl.cluster_view().nodes or ()] == ["n1"]
    woken.clear()
    ctl.node_event("n1", _node("n1", 8, heartbeat="t1"), "MODIFIED")  # a heartbeat changes no fact
    assert not woken.is_set()
    ctl.pod_event("uid-1", _pod("n1", 4), "ADDED")
    assert woken.is_set() and ctl.cluster_view().gpu_usage == {"n1": {"nvidia.com/gpu": 4}}
    woken.clear()
    ctl.pod_event("uid-2", _pod("n1", 2), "ADDED")
    assert ctl.cluster_view().gpu_usage == {"n1": {"nvidia.com/gpu": 6}}
    ctl.pod_event("uid-1", _pod("n1", 4, phase="Succeeded"), "MODIFIED")  # finished pods hold nothing
    assert ctl.cluster_view().gpu_usage == {"n1": {"nvidia.com/gpu": 2}}
    ctl.node_event("n1", _node("n1", 8), "DELETED")
    assert ctl.cluster_view().nodes == ()
    ctl.reset()
    assert ctl.cluster_view().nodes is None and not ctl.pod_usage


def test_the_client_is_rebuilt_when_the_credentials_change(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    class FakeClient:
        def __init__(self, info: Any, field_manager: str) -> None:
            self.info, self.closed = info, False
            made.append(self)

        async def close(self) -> None:
            self.closed = True

    monkeypatch.setattr("largemodel.operator.controller.KubeClient", FakeClient)

    async def scenario() -> None:
        ctl = Controller()
        with pytest.raises(kopf.TemporaryError, match="no API credentials"):
            await ctl.get_client()
        ctl.connection = first = object()  # type: ignore[assignment]
        client = await ctl.get_client()
        assert await ctl.get_client() is client and client.info is first
        ctl.connection = object()  # type: ignore[assignment]  # a re-login after a 401
        fresh = await ctl.get_client()
        assert fresh is not client and client.closed and not fresh.closed
        await ctl.close()
        assert fresh.closed and ctl.client is None

    asyncio.run(scenario())
