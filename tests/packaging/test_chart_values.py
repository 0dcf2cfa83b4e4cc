"""values.schema.json rejects bad values with a message naming the key; good overrides render."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from tests.support.chartrender import CHART_DIR, NAMESPACE, by_kind, render, render_objects

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    ({"operator": {"metricsPort": "9090"}}, "/operator/metricsPort"),
    ({"operator": {"verbose": "yes"}}, "/operator/verbose"),
    ({"operator": {"resyncSeconds": 0}}, "/operator/resyncSeconds"),
    ({"operator": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}}, "/operator/resources/requests/cpu"),
    ({"operator": {"resources": {"limits": {"gpu": 1}}}}, "/operator/resources/limits"),
    ({"watch": {"allNamespaces": True, "namespaces": ["team-a"]}}, "/watch/namespaces"),
    ({"watch": {"allNamespaces": False, "namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    ({"watch": {"allNamespaces": "yes"}}, "/watch/allNamespaces"),
    ({"serviceAccount": {"create": False}}, "/serviceAccount/name"),
    ({"rbac": {"readSecrets": "true"}}, "/rbac/readSecrets"),
    ({"monitoring": {"podMonitor": {"enabled": True, "interval": "15 seconds"}}}, "/monitoring/podMonitor/interval"),
    ({"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": 1}}}}, "/monitoring/serviceMonitor/labels/release"),
    ({"dashboards": {"enabled": True, "label": ""}}, "/dashboards/label"),
    ({"fullnameOverride": "Not A DNS Name"}, "/fullnameOverride"),
    ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
    ({"operator": {"hostNetwork": True}}, "additional properties 'hostNetwork' not allowed"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(values)
    assert where in str(caught.value)
    report = helm_python.lint(CHART_DIR, values, namespace=NAMESPACE)
    assert any(m["severity"] == 3 and where in m["error"] for m in report["messages"]), report


def test_defaults_and_overrides_pass_the_schema() -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.values)
    overrides = {
        "image": {"repository": "registry.example.com:5000/ml/largemodel-operator", "tag": "0.2.0-rc.1"},
        "imagePullSecrets": [{"name": "registry-creds"}],
        "watch": {"allNamespaces": False, "namespaces": ["ml-prod"]},
        "serviceAccount": {"create": False, "name": "existing-operator"},
        "operator": {"verbose": True, "resyncSeconds": 30, "resources": {"requests": {"cpu": 0.5, "memory": "256Mi"},
                                                        "limits": {"cpu": 2, "memory": "1Gi"}},
                     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                     "nodeSelector": {"kubernetes.io/os": "linux"}},
        "monitoring": {"podMonitor": {"enabled": True, "interval": "1m30s", "scrapeTimeout": "20s"}},
    }
    objects = render_objects(overrides)
    assert by_kind(objects, "ServiceAccount") == []
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-operator"
    assert pod["containers"][0]["image"] == "registry.example.com:5000/ml/largemodel-operator:0.2.0-rc.1"
    args = pod["containers"][0]["args"]
    assert "--verbose" in args and "--resync-seconds=30" in args
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "ml-prod"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "existing-operator", "namespace": NAMESPACE}]

