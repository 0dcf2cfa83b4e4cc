"""The generated CRD: identical to crds/, a valid structural CRD, and it admits what it should.

Admission is checked the way kube-apiserver does it (crdcheck: defaults, schema, CEL) with
jsonschema and cel-python; every CEL rule in the CRD has a passing and a failing case here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from largemodel.operator import api
from largemodel.operator.crd import crd_yaml, generate_crd, openapi_schema
from largemodel.operator.manifest import InputError, parse_largemodel
from largemodel.operator.planner import PlanError, plan_parallelism
from tests.support.crdcheck import admit, apply_defaults, cel_failures, rules
from tests.support.examples import EXAMPLES, example, run_largemodel
from tests.support.paths import REPO

CRD_FILE = REPO / "crds" / "serving.largemodel.io_largemodels.yaml"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_crd_file_is_the_generated_output() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `largemodel crd > " + str(CRD_FILE.relative_to(REPO)) + "`"
    result = run_largemodel("crd")
    assert result.returncode == 0 and result.stdout == CRD_FILE.read_text()


@pytest.mark.parametrize("version", ["1.28", "1.37"])
def test_crd_validates_with_kubernetes_validate(version: str) -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    kubernetes_validate.validate(crd, version, strict=True)


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    yield path or ".", node
    for name, prop in node.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    for path, node in walk(openapi_schema()):
        forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"} & set(node)
        assert not forbidden, f"{path} has {forbidden}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            assert node["default"] is not None, path


def test_crd_shape() -> None:
    crd = generate_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "largemodels.serving.largemodel.io"
    assert spec["scope"] == "Namespaced" and spec["names"]["shortNames"] == ["lm"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".status.selector"},
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["TP", "PP", "REPLICAS", "READY", "PHASE", "AGE"]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["parallelism"]["properties"]["tensor"] == {
        "x-kubernetes-int-or-string": True, "default": "auto", "description": "TP size (GPUs per pod) or auto."}
    architecture = props["model"]["properties"]["architecture"]
    assert architecture["nullable"] is True and "default" not in architecture
    assert props["gpu"]["default"] == {} and props["gpu"]["properties"]["perNode"]["default"] == 8
    assert props["gpu"]["properties"]["memoryGiB"]["exclusiveMinimum"] is True


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_are_admitted(name: str) -> None:
    defaulted, errors = admit(openapi_schema(), example(name))
    assert errors == []
    # Defaults the server fills match what pydantic fills.
    parsed = api.LargeModel.model_validate(example(name))
    assert defaulted["spec"]["engine"] == parsed.spec.engine
    assert defaulted["spec"]["restart"] == parsed.spec.restart.model_dump(by_alias=True)
    assert defaulted["spec"]["rollout"] == {"maxUnavailableGroups": 1}


Mutation = Callable[[dict[str, Any]], None]


def setp(path: str, value: Any) -> Mutation:
    """A mutation that sets spec field `a.b.c` (creating parents), or deletes it for value ...."""

    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = body
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value

    return mutate


# (case, mutation of examples/llama3-70b.yaml, error the API server reports)
BAD = [
    ("unknown field", setp("spec.parallelism.tensr", 8), "Additional properties are not allowed ('tensr'"),
    ("bad dtype", setp("spec.model.dtype", "int4"), "'int4' is not one of ['float32', 'float16', 'bfloat16']"),
    ("negative replicas", setp("spec.replicas", -1), "-1 is less than the minimum of 0"),
    ("zero micro-batches", setp("spec.parallelism.microBatches", 0), "0 is less than the minimum of 1"),
    ("no model", setp("spec.model", ...), "'model' is a required property"),
    ("tensor word", setp("spec.parallelism.tensor", "eight"), "parallelism.tensor must be an integer >= 1 or 'auto'"),
    ("tensor zero", setp("spec.parallelism.tensor", 0), "parallelism.tensor must be an integer >= 1 or 'auto'"),
    ("pipeline zero", setp("spec.parallelism.pipeline", 0), "parallelism.pipeline must be an integer >= 1 or 'auto'"),
    ("tp beyond node", setp("spec.parallelism.tensor", 16), "parallelism.tensor must be <= gpu.perNode"),
    ("tp beyond defaulted node", lambda b: (setp("spec.gpu", ...)(b), setp("spec.parallelism.tensor", 16)(b)),
     "parallelism.tensor must be <= gpu.perNode"),
    ("bad uri", setp("spec.model.uri", "http://x/y"), "model.uri must start with pvc://, file://, hf:// or s3://"),
    ("same ports", setp("spec.serving.grpcPort", 8000), "serving.httpPort and serving.grpcPort must differ"),
    ("metrics port clash", setp("spec.serving.metricsPort", 9000), "serving.metricsPort must differ"),
    ("kv heads", setp("spec.model.architecture.numKeyValueHeads", 7), "numAttentionHeads must be a multiple of numKeyValueHeads"),
    ("name starts with digit", setp("metadata.name", "70b"), "metadata.name must start with a letter"),
    ("long name", setp("metadata.name", "a" * 41), "metadata.name must be at most 40 characters"),
    ("empty allowFrom peer", setp("spec.serving.allowFrom", [{}]),
     "serving.allowFrom: each entry needs podSelector, namespaceSelector or cidr"),
    ("cidr with selector", setp("spec.serving.allowFrom", [{"cidr": "10.0.0.0/8", "podSelector": {"a": "b"}}]),
     "serving.allowFrom: cidr cannot be combined with podSelector or namespaceSelector"),
    ("exclusive without topologyKey", setp("spec.placement", {"exclusive": True}),
     "placement.exclusive needs placement.topologyKey"),
    ("queueName without kueue or volcano", setp("spec.placement", {"queueName": "team-a"}),
     "placement.queueName needs placement.gang kueue or volcano"),
    ("unknown gang mode", setp("spec.placement", {"gang": "yunikorn"}), "'yunikorn' is not one of"),
    ("collective timeout too short", setp("spec.restart", {"collectiveTimeoutSeconds": 1}),
     "1 is less than the minimum of 5"),
    ("unknown quantization", setp("spec.model.quantization", "int4"), "'int4' is not one of"),
    ("gguf without a gguf file", setp("spec.model.quantization", "gguf"),
     "model.quantization gguf needs model.uri to name a .gguf file"),
    ("quantized deepspeed", lambda b: (setp("spec.model.quantization", "int8")(b), setp("spec.engine", "deepspeed")(b)),
     "model.quantization needs engine native"),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_resources_are_rejected_by_the_crd_and_by_the_cli(case: str, mutate: Mutation, expected: str) -> None:
    body = example("llama3-70b.yaml")
    mutate(body)
    _, errors = admit(openapi_schema(), body)
    assert any(expected in e for e in errors), errors
    # What the API server refuses, `largemodel plan` refuses too (schema in pydantic, rest in the planner).
    with pytest.raises((InputError, PlanError)):
        plan_parallelism(parse_largemodel(body, "test").spec)


def test_every_cel_rule_passes_on_the_examples_and_fails_on_a_case() -> None:
    schema = openapi_schema()
    messages = {rule["message"] for _, rule in rules(schema)}
    assert len(messages) >= 8
    for name in EXAMPLE_FILES:
        assert cel_failures(schema, apply_defaults(schema, example(name))) == []
    failing: set[str] = set()
    for _, mutate, _ in BAD:
        body = example("llama3-70b.yaml")
        mutate(body)
        # CEL runs on its own here, so rules that the schema already covers are exercised too.
        for failure in cel_failures(schema, apply_defaults(schema, copy.deepcopy(body))):
            failing.add(failure.split(": ", 1)[1])
    assert failing == messages


def test_auto_and_string_sizes() -> None:
    schema = openapi_schema()
    body = example("llama31-405b.yaml")
    assert admit(schema, body)[1] == []
    body["spec"]["parallelism"] = {"tensor": "auto", "pipeline": 2}
    assert admit(schema, body)[1] == []
    body["spec"]["parallelism"] = {}
    defaulted, errors = admit(schema, body)
    assert errors == [] and defaulted["spec"]["parallelism"] == {"tensor": "auto", "pipeline": "auto", "microBatches": 4}
