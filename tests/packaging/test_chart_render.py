"""The chart lints and renders through the Helm v4 SDK, and every object it renders is valid.

Kubernetes kinds are validated with kubernetes-validate (strict) for 1.28 and 1.37. The
Prometheus operator kinds (PodMonitor, ServiceMonitor, PrometheusRule) are CRDs that
kubernetes-validate has no schema for: they are checked against PROMETHEUS_OPERATOR_SCHEMAS below,
a minimal structural subset of monitoring.coreos.com/v1 that states every field the chart emits,
its type, and the fields the Prometheus operator requires.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.chartrender import (
    CHART_DIR,
    CONFIGS,
    NAMESPACE,
    RELEASE,
    WATCHED,
    by_kind,
    copy_chart,
    render,
    render_objects,
)
from tests.support.paths import REPO

KUBE_VERSIONS = ["1.28", "1.37"]
FILES = CHART_DIR / "files"

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABELING},
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}


def _cr(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


PROMETHEUS_OPERATOR_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": _cr("PodMonitor", {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NAMESPACE_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    }),
    "ServiceMonitor": _cr("ServiceMonitor", {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NAMESPACE_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    }),
    "PrometheusRule": _cr("PrometheusRule", {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {"type": "array", "items": _RULE},
                    },
                },
            }
        },
    }),
}


def validate_object(obj: dict[str, Any], version: str) -> None:
    """Validate one rendered object as the API server of `version` would accept it."""
    schema = PROMETHEUS_OPERATOR_SCHEMAS.get(obj["kind"])
    if schema is not None:
        jsonschema.validate(obj, schema)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(config: str) -> list[dict[str, Any]]:
    return render_objects(CONFIGS[config])


@pytest.mark.parametrize("kube_version", ["v1.28.0", "v1.37.0"])
def test_lint_is_clean(config: str, kube_version: str) -> None:
    report = helm_python.lint(CHART_DIR, CONFIGS[config], strict=True, namespace=NAMESPACE, kube_version=kube_version)
    assert report["errors"] == []
    # Severity 1 (info) is only "icon is recommended": no icon is published for the project.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_validates(objects: list[dict[str, Any]], version: str) -> None:
    assert objects, "the chart rendered nothing"
    for obj in objects:
        try:
            validate_object(obj, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            cause = getattr(err, "caught", err)
            where = ".".join(str(p) for p in cause.absolute_path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version} at {where}: {cause.message}")


def test_minimal_prometheus_schemas_reject_wrong_objects() -> None:
    good = by_kind(render_objects(CONFIGS["everything"]), "PodMonitor")[0]
    wrong_port = json.loads(json.dumps(good))
    wrong_port["spec"]["podMetricsEndpoints"][0]["port"] = 9100
    bad_interval = json.loads(json.dumps(good))
    bad_interval["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    for bad in (wrong_port, bad_interval):
        with pytest.raises(jsonschema.ValidationError):
            validate_object(bad, "1.37")
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "x", "namespace": "y"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "record": "r", "expr": "up"}]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_object(rule, "1.37")


def test_kinds_per_install() -> None:
    kinds = {name: sorted(obj["kind"] for obj in render_objects(values)) for name, values in CONFIGS.items()}
    core = ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "NetworkPolicy",
            "Service", "ServiceAccount"]
    assert kinds["default"] == core
    dashboards = len(list((FILES / "dashboards").glob("*.json")))
    monitoring = ["PodMonitor", "PrometheusRule", "ServiceMonitor"] + ["ConfigMap"] * dashboards
    assert kinds["everything"] == sorted(core + monitoring)
    # A namespaced install still reads Nodes (cluster-scoped, issue 17) through a ClusterRole of its own.
    namespaced = core + ["Role", "RoleBinding"] * len(WATCHED)
    assert kinds["namespaced"] == sorted(namespaced + monitoring)


def _deployment(values: dict[str, Any]) -> dict[str, Any]:
    (deployment,) = by_kind(render_objects(values), "Deployment")
    return deployment


def test_operator_pod_is_locked_down(config: str) -> None:
    pod = _deployment(CONFIGS[config])["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsUser"] >= 10000
    assert set(container["resources"]) == {"requests", "limits"}
    # The API token goes only where it is needed: the operator container, by projection.
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    token_volume = next(v for v in pod["volumes"] if v["name"] == mounts["/var/run/secrets/kubernetes.io/serviceaccount"])
    assert {"serviceAccountToken", "configMap", "downwardAPI"} == {
        key for source in token_volume["projected"]["sources"] for key in source
    }
    assert "/tmp" in mounts
    ports = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports


def test_watch_scope_reaches_the_operator_arguments() -> None:
    cluster_args = _deployment(CONFIGS["default"])["spec"]["template"]["spec"]["containers"][0]["args"]
    namespaced_args = _deployment(CONFIGS["namespaced"])["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in cluster_args
    assert not any(a.startswith("--namespace") for a in cluster_args)
    assert "--all-namespaces" not in namespaced_args
    assert [a for a in namespaced_args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in WATCHED]
    release_only = _deployment({"watch": {"allNamespaces": False}})["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in release_only["args"] if a.startswith("--namespace")] == [f"--namespace={NAMESPACE}"]


def test_operator_accepts_the_arguments_the_chart_passes(config: str) -> None:
    from largemodel.operator.runner import parse_args

    (container,) = _deployment(CONFIGS[config])["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["largemodel"] and container["args"][0] == "operator"
    args = parse_args(container["args"][1:])
    assert args.all_namespaces == (config != "namespaced")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == args.metrics_port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_image_reference_follows_values() -> None:
    image = _deployment({})["spec"]["template"]["spec"]["containers"][0]["image"]
    with helm_python.Chart.load(CHART_DIR) as chart:
        assert image == f"largemodel-operator:{chart.metadata['appVersion']}"
    digest = "sha256:" + "0f" * 32
    pinned = _deployment({"image": {"repository": "registry.example.com/ml/largemodel-operator", "tag": "0.1.1",
                                    "digest": digest, "pullPolicy": "Always"}})
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"registry.example.com/ml/largemodel-operator:0.1.1@{digest}"
    )
    # A skip stays in the chart only while the value it excuses keeps its default.
    assert "annotations" not in pinned["metadata"]


def test_podmonitor_scrapes_rank_pods_by_label() -> None:
    for config, namespaces in (("everything", None), ("namespaced", WATCHED)):
        (monitor,) = by_kind(render_objects(CONFIGS[config]), "PodMonitor")
        spec = monitor["spec"]
        assert spec["selector"] == {"matchExpressions": [{"key": "serving.largemodel.io/name", "operator": "Exists"}]}
        assert spec["namespaceSelector"] == ({"any": True} if namespaces is None else {"matchNames": namespaces})
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_servicemonitor_selects_the_operator_metrics_service() -> None:
    objects = render_objects(CONFIGS["everything"])
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = by_kind(objects, "Service")
    (deployment,) = by_kind(objects, "Deployment")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # operator series label the LargeModel's namespace; Prometheus must keep it, not rename it
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_prometheusrule_wraps_the_alert_rules_file() -> None:
    (rule,) = by_kind(render_objects(CONFIGS["everything"]), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((FILES / "alerts.rules.yaml").read_text())["groups"]


def test_prometheusrule_refuses_a_missing_or_broken_rules_file(tmp_path: Path) -> None:
    chart = copy_chart(tmp_path)
    rules = chart / "files" / "alerts.rules.yaml"
    rules.write_text("groups: [unclosed\n")
    with pytest.raises(helm_python.HelmError, match="alerts.rules.yaml is not valid YAML"):
        render(CONFIGS["everything"], chart)
    rules.unlink()
    with pytest.raises(helm_python.HelmError, match="needs files/alerts.rules.yaml"):
        render(CONFIGS["everything"], chart)
    assert by_kind(render_objects({}, chart), "PrometheusRule") == []


def _dashboard_maps(chart: Path, namespace: str | None = None) -> dict[str, dict[str, Any]]:
    values: dict[str, Any] = {"dashboards": {"enabled": True, **({"namespace": namespace} if namespace else {})}}
    return {cm["metadata"]["name"]: cm for cm in by_kind(render_objects(values, chart), "ConfigMap")}


def test_dashboards_configmaps_carry_every_json_file() -> None:
    maps = _dashboard_maps(CHART_DIR)
    files = sorted((FILES / "dashboards").glob("*.json"))
    assert len(maps) == len(files)
    by_key = {key: (cm, text) for cm in maps.values() for key, text in cm["data"].items()}
    for path in files:
        cm, text = by_key[path.name.lower()]
        assert json.loads(text) == json.loads(path.read_text())
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == NAMESPACE


def test_dashboards_render_whatever_json_files_exist(tmp_path: Path) -> None:
    chart = copy_chart(tmp_path)
    folder = chart / "files" / "dashboards"
    for old in folder.glob("*.json"):
        old.unlink()
    assert _dashboard_maps(chart) == {}
    panels = {"title": "Fleet", "panels": [{"type": "timeseries", "targets": [{"expr": "sum(up)"}]}]}
    (folder / "Fleet_Overview.json").write_text(json.dumps(panels))
    (folder / "kv-cache.json").write_text(json.dumps({"title": "KV"}))
    maps = _dashboard_maps(chart, namespace="monitoring")
    assert sorted(maps) == [f"{RELEASE}-largemodel-dashboard-fleet-overview", f"{RELEASE}-largemodel-dashboard-kv-cache"]
    fleet = maps[f"{RELEASE}-largemodel-dashboard-fleet-overview"]
    assert json.loads(fleet["data"]["fleet-overview.json"]) == panels
    assert fleet["metadata"]["namespace"] == "monitoring"
    assert fleet["metadata"]["annotations"] == {"grafana_folder": "largemodel"}


def test_notes_tell_the_next_step() -> None:
    notes = render(CONFIGS["namespaced"])["largemodel/templates/NOTES.txt"]
    assert "kubectl apply -n team-a -f examples/" in notes
    assert "kubectl get lm" in notes
    assert "team-a, team-b" in notes
    example = notes.split("-f ", 1)[1].split()[0]
    assert (REPO / example).is_file(), f"NOTES name a missing example {example}"


def test_packaged_chart_renders_like_the_directory(tmp_path: Path) -> None:
    archive = Path(helm_python.package(CHART_DIR, destination=tmp_path))
    assert archive.name.startswith("largemodel-") and archive.suffix == ".tgz"
    with helm_python.Chart.load_archive(archive.read_bytes()) as packaged:
        names = {f["name"] for f in packaged.files}
        assert "files/alerts.rules.yaml" in names and "files/alerts.test.yaml" not in names
        assert [crd["filename"] for crd in packaged.crds] == ["largemodel/crds/serving.largemodel.io_largemodels.yaml"]
        rendered = packaged.render(CONFIGS["everything"], name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert rendered == render(CONFIGS["everything"])
