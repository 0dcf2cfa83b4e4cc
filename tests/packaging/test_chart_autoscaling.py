"""autoscaling.largeModels renders a KEDA ScaledObject or an HPA per LargeModel, valid against their schemas
and aimed at the LargeModel's scale subresource (issue 18)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.chartrender import by_kind, chart_crds, render, render_objects

SCHEMAS = Path(__file__).resolve().parents[1] / "operator" / "schemas"
ENTRIES = [
    {"name": "llama", "namespace": "prod", "maxReplicas": 4, "metric": "queue", "target": 8},
    {"name": "mix", "namespace": "dev", "minReplicas": 2, "maxReplicas": 3, "metric": "kv", "target": 0.8},
    {"name": "tall", "namespace": "prod", "maxReplicas": 6, "metric": "queue", "target": 16, "engine": "hpa"},
]


def _strict(schema: Any) -> Any:
    """Unknown fields forbidden, as a real API server prunes them (our objects must not rely on them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def scaledobject_schema() -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"]["enum"] = [f"{crd['spec']['group']}/{version['name']}"]
    schema["properties"]["kind"]["enum"] = [crd["spec"]["names"]["kind"]]
    return schema


def _rendered(engine: str = "keda") -> list[dict[str, Any]]:
    return render_objects({"autoscaling": {"engine": engine, "largeModels": ENTRIES}})


def test_off_by_default() -> None:
    objects = render_objects({})
    assert by_kind(objects, "ScaledObject") == [] and by_kind(objects, "HorizontalPodAutoscaler") == []


def test_one_scaler_per_largemodel_validates() -> None:
    objects = _rendered()
    scaled, hpas = by_kind(objects, "ScaledObject"), by_kind(objects, "HorizontalPodAutoscaler")
    assert [o["metadata"]["name"] for o in scaled] == ["llama", "mix"]
    assert [o["metadata"]["name"] for o in hpas] == ["tall"]
    schema = scaledobject_schema()
    for obj in scaled:
        jsonschema.validate(obj, schema)
    for obj in hpas:
        for version in ("1.28", "1.37"):
            kubernetes_validate.validate(obj, version, strict=True)


def test_scalers_target_the_scale_subresource_of_the_crd() -> None:
    (crd,) = [c for c in chart_crds() if c["spec"]["names"]["kind"] == "LargeModel"]
    (served,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    assert served["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    want = {"apiVersion": f"{crd['spec']['group']}/{served['name']}", "kind": "LargeModel"}
    for obj in by_kind(_rendered(), "ScaledObject") + by_kind(_rendered("hpa"), "HorizontalPodAutoscaler"):
        ref = obj["spec"]["scaleTargetRef"]
        assert {k: ref[k] for k in want} == want and ref["name"] == obj["metadata"]["name"]
        entry = next(e for e in ENTRIES if e["name"] == ref["name"])
        assert obj["metadata"]["namespace"] == entry["namespace"]


def test_triggers_read_the_protocol_gauges_per_group() -> None:
    scaled = {o["metadata"]["name"]: o["spec"] for o in by_kind(_rendered(), "ScaledObject")}
    llama = scaled["llama"]
    assert (llama["minReplicaCount"], llama["maxReplicaCount"]) == (1, 4)
    (trigger,) = llama["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(largemodel_requests_waiting{namespace="prod", largemodel="llama"})'
    assert trigger["metadata"]["threshold"] == "8"
    mix = scaled["mix"]["triggers"][0]["metadata"]
    assert mix["query"] == 'sum(largemodel_kv_cache_usage_ratio{namespace="dev", largemodel="mix"})'
    assert mix["threshold"] == "0.8" and scaled["mix"]["minReplicaCount"] == 2
    hpas = {o["metadata"]["name"]: o["spec"] for o in by_kind(_rendered("hpa"), "HorizontalPodAutoscaler")}
    (metric,) = hpas["mix"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {"name": "largemodel_kv_cache_usage_ratio",
                                            "selector": {"matchLabels": {"largemodel": "mix"}}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "0.8"}


def test_schemas_reject_wrong_objects() -> None:
    schema = scaledobject_schema()
    good = by_kind(_rendered(), "ScaledObject")[0]
    typo = copy.deepcopy(good)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    no_target = copy.deepcopy(good)
    del no_target["spec"]["scaleTargetRef"]
    numeric = copy.deepcopy(good)
    numeric["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    for bad in (typo, no_target, numeric):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    hpa = by_kind(_rendered("hpa"), "HorizontalPodAutoscaler")[0]
    hpa["spec"]["metrics"][0]["external"]["averageValue"] = hpa["spec"]["metrics"][0]["external"].pop("target")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, "1.37", strict=True)


@pytest.mark.parametrize(("entry", "where"), [
    ({"metric": "latency"}, "/autoscaling/largeModels/0/metric"),
    ({"target": 0}, "/autoscaling/largeModels/0/target"),
    ({"engine": "vpa"}, "/autoscaling/largeModels/0/engine"),
    ({"name": "Llama"}, "/autoscaling/largeModels/0/name"),
])
def test_values_schema_rejects_bad_entries(entry: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render({"autoscaling": {"largeModels": [{**ENTRIES[0], **entry}]}})
    assert where in str(caught.value)


def test_min_above_max_fails_the_render() -> None:
    with pytest.raises(Exception, match="minReplicas 5 > maxReplicas 4"):
        render({"autoscaling": {"largeModels": [{**ENTRIES[0], "minReplicas": 5}]}})
