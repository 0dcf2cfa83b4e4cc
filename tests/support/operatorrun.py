"""Run the real operator (kopf's KopfRunner, in a thread) against a MockCluster, and check on it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kopf.testing import KopfRunner

from largemodel.operator import handlers, rbac
from largemodel.operator.kubeclient import USER_AGENT
from tests.support.mockcluster import MockCluster

OPERATOR_AGENTS = ("kopf/", USER_AGENT.split("/")[0] + "/")
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}

T = TypeVar("T")


@contextmanager
def running_operator(cluster: MockCluster, namespaces: list[str], resync: float = 30.0) -> Iterator[KopfRunner]:
    """`kopf run -m largemodel.operator.handlers --standalone --namespace ...` until the block ends."""
    handlers.configure(handlers.OperatorConfig(resync_seconds=resync, batch_window=0.02))
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    args = ["run", "--standalone", "-m", "largemodel.operator.handlers"]
    for ns in namespaces:
        args += ["--namespace", ns]
    try:
        with KopfRunner(args, timeout=30) as runner:
            yield runner
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
    assert runner.exception is None, runner.output[-3000:]


def wait_for(check: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, IndexError) as err:  # the object is not there (yet)
            last = err
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


def operator_requests(cluster: MockCluster) -> list[Any]:
    """Every request the operator (kopf or the reconcile client) made."""
    return [r for r in list(cluster.mock._requests)
            if str(r.headers.get("User-Agent", "")).startswith(OPERATOR_AGENTS)]


def operator_writes(cluster: MockCluster) -> list[Any]:
    """The operator's write requests (creates, patches, deletes, Events included)."""
    return [r for r in operator_requests(cluster) if str(r.method.value) in WRITE_METHODS]


def rbac_triple(request: Any) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of an API request; None for discovery."""
    res = request.resource
    if res is None or res.plural is None:
        return None
    method = str(request.method.value)
    if method == "GET":
        verb = "watch" if request.params.get("watch") == "true" else "get" if request.name else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    resource = f"{res.plural}/{request.subresource}" if request.subresource else res.plural
    return (res.group or "", resource, verb)


def assert_within_rbac(cluster: MockCluster) -> set[tuple[str, str, str]]:
    """Every operator request is granted by rbac.RULES; returns the (group, resource, verb) used."""
    used = {t for t in map(rbac_triple, operator_requests(cluster)) if t is not None}
    outside = sorted(t for t in used if not rbac.allowed(*t))
    assert not outside, f"the operator used verbs that rbac.RULES does not grant: {outside}"
    return used
