"""The chart grants exactly largemodel.operator.rbac.RULES: no more, no less, no wildcards."""

from __future__ import annotations

import json
from typing import Any

from largemodel.operator.rbac import CLUSTER_RULES, RULES
from tests.support.chartrender import CONFIGS, NAMESPACE, WATCHED, by_kind, render_objects

SECRETS_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}


def _canonical(rules: list[dict[str, Any]]) -> list[str]:
    """Rules as sorted JSON, field order and list order aside (RBAC grants are a union)."""
    return sorted(json.dumps({k: sorted(v) for k, v in rule.items()}, sort_keys=True) for rule in rules)


def _roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(objects, "ClusterRole") + by_kind(objects, "Role")


def test_cluster_wide_install_grants_exactly_the_documented_rules() -> None:
    objects = render_objects(CONFIGS["default"])
    (role,) = by_kind(objects, "ClusterRole")
    assert _canonical(role["rules"]) == _canonical([*RULES, *CLUSTER_RULES])
    assert by_kind(objects, "Role") == [] and by_kind(objects, "RoleBinding") == []
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    (account,) = by_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]


def test_namespaced_install_grants_them_only_in_watched_namespaces() -> None:
    objects = render_objects(CONFIGS["namespaced"])
    # Cluster-wide only what is cluster-scoped: list/watch Nodes (issue 17), through its own ClusterRole.
    (nodes,) = by_kind(objects, "ClusterRole")
    assert _canonical(nodes["rules"]) == _canonical(CLUSTER_RULES)
    (nodes_binding,) = by_kind(objects, "ClusterRoleBinding")
    assert nodes_binding["roleRef"]["name"] == nodes["metadata"]["name"]
    assert nodes_binding["subjects"][0]["namespace"] == NAMESPACE
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(WATCHED)
    for role in roles:
        assert _canonical(role["rules"]) == _canonical(RULES)
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objects, "RoleBinding")}
    assert sorted(bindings) == sorted(WATCHED)
    for namespace, binding in bindings.items():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE, f"binding in {namespace} names the operator's SA"


def test_no_wildcards_and_no_secret_reads_in_any_install() -> None:
    for name, values in CONFIGS.items():
        for role in _roles(render_objects(values)):
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], f"{name}: wildcard in {rule}"
                if "secrets" in rule["resources"]:  # create the group Secret, never read one
                    assert rule["verbs"] == ["create"], f"{name}: secrets readable without rbac.readSecrets"
                assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def test_secrets_only_when_a_value_asks() -> None:
    (role,) = _roles(render_objects({"rbac": {"readSecrets": True}}))
    assert _canonical(role["rules"]) == _canonical([*RULES, *CLUSTER_RULES, SECRETS_RULE])
    objects = render_objects({"rbac": {"readSecrets": True}, "watch": {"allNamespaces": False}})
    (role,) = by_kind(objects, "Role")
    assert _canonical(role["rules"]) == _canonical([*RULES, SECRETS_RULE])


def test_rbac_create_false_leaves_rbac_to_the_cluster_admin() -> None:
    objects = render_objects({"rbac": {"create": False}})
    assert not [o for o in objects if o["kind"].endswith(("Role", "RoleBinding"))]
    assert len(by_kind(objects, "Deployment")) == 1
