"""RBAC rules as data, the request -> (group, resource, verb) mapping the e2e tests use, restart budget."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kmock._internal.rendering import Request

from largemodel.operator import api, rbac
from largemodel.operator.restarts import (
    RESTARTS_ANNOTATION,
    GroupRestarts,
    RestartHistory,
    backoff_seconds,
    decide_restart,
    dump_history,
    load_history,
    may_start,
)
from tests.support.operatorrun import rbac_triple


@pytest.mark.parametrize("version", ["1.28", "1.37"])
@pytest.mark.parametrize("namespace", [None, "models"])
def test_roles_validate(version: str, namespace: str | None) -> None:
    kubernetes_validate.validate(rbac.role("largemodel-operator", namespace), version, strict=True)


def test_rules_grant_only_what_they_list() -> None:
    assert rbac.allowed(api.GROUP, "largemodels/status", "patch")
    assert rbac.allowed("apps", "statefulsets", "delete")
    assert not rbac.allowed("", "pods", "delete")  # pods are never written
    assert not rbac.allowed(api.GROUP, "largemodels", "update")  # no PUT anywhere
    assert not rbac.allowed(api.GROUP, "largemodels/status", "update")
    assert not rbac.allowed("", "secrets", "get")


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/apis/apps/v1/namespaces/ns/statefulsets", "watch=true", ("apps", "statefulsets", "watch")),
        ("GET", "/apis/apps/v1/namespaces/ns/statefulsets", "labelSelector=a%3Db", ("apps", "statefulsets", "list")),
        ("GET", "/api/v1/namespaces/ns/pods/p", "", ("", "pods", "get")),
        ("POST", "/api/v1/namespaces/ns/events", "", ("", "events", "create")),
        ("PATCH", f"/apis/{api.GROUP}/v1alpha1/namespaces/ns/largemodels/m/status", "",
         (api.GROUP, "largemodels/status", "patch")),
        ("PUT", f"/apis/{api.GROUP}/v1alpha1/namespaces/ns/largemodels/m", "", (api.GROUP, "largemodels", "update")),
        ("DELETE", "/apis/apps/v1/namespaces/ns/statefulsets/s", "", ("apps", "statefulsets", "delete")),
        ("GET", "/apis", "", None),
    ],
)
def test_request_to_rbac_triple(method: str, path: str, query: str, expected: tuple[str, str, str] | None) -> None:
    from kmock._internal import parsing, references

    k8s = parsing.parse_path(path)
    params = dict(p.split("=", 1) for p in query.split("&") if p)
    resource = None if k8s.group is None else references.resource(k8s.group, k8s.version, k8s.plural)
    request = Request(method=method, url=path, params=params, resource=resource, namespace=k8s.namespace,
                      name=k8s.name, subresource=k8s.subresource)
    assert rbac_triple(request) == expected


POLICY = api.Restart(maxGroupRestarts=3, windowSeconds=100, backoffSeconds=10)


@pytest.mark.parametrize(("k", "wait"), [(0, 0), (1, 10), (2, 20), (3, 40), (10, 100)])
def test_backoff_doubles_and_is_capped_by_the_window(k: int, wait: float) -> None:
    assert backoff_seconds(k, POLICY) == wait


def test_history_round_trips_and_survives_bad_annotations() -> None:
    history = RestartHistory("rev1", {0: GroupRestarts(total=2, times=(5.0, 7.5), uid="u", not_before=9.0)})
    assert load_history({RESTARTS_ANNOTATION: dump_history(history)}, "rev1") == history
    assert load_history({RESTARTS_ANNOTATION: dump_history(history)}, "rev2").groups == {}  # new revision
    for bad in ("{", "[]", '{"revision": "rev1", "groups": {"x": {}}}', '{"revision": "rev1", "groups": 3}'):
        assert load_history({RESTARTS_ANNOTATION: bad}, "rev1").groups == {}


def test_budget_window_slides() -> None:
    record = GroupRestarts()
    for now in (0.0, 10.0, 20.0):
        decision = decide_restart(record, f"uid-{now}", POLICY, now)
        assert decision.restart and decision.counted
        record = decision.record
    exhausted = decide_restart(record, "uid-last", POLICY, 30.0)
    assert not exhausted.restart and exhausted.record.down
    assert may_start(exhausted.record, POLICY, 50.0)[0] is False
    allowed, again, _ = may_start(exhausted.record, POLICY, 101.0)  # the restart at t=0 left the window
    assert allowed and not again.down and again.total == 4
