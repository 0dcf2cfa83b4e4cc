"""Generate the LargeModel CustomResourceDefinition from the pydantic models in api.py.

pydantic writes JSON Schema 2020-12; the API server wants a structural OpenAPI v3 schema. The
conversion: inline every $ref, turn `X | None` into `nullable: true`, turn `int | 'auto'` into
`x-kubernetes-int-or-string`, drop what structural schemas forbid (titles, `additionalProperties:
false` beside properties, null defaults), and give optional object fields `default: {}` so the API
server applies their nested defaults before the CEL rules run (as pydantic does).
"""

from __future__ import annotations

from typing import Any

import yaml

from largemodel.operator import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
_DROP_KEYS = frozenset({"title", "$defs", "examples"})

# Rules on the whole object: the name becomes a Service name (DNS-1035) and gets suffixes.
ROOT_RULES = [
    {
        "rule": f"self.metadata.name.size() <= {api.NAME_MAX_LENGTH}",
        "message": f"metadata.name must be at most {api.NAME_MAX_LENGTH} characters "
        "(child objects add suffixes such as -ranks and -g<i>)",
    },
    {
        "rule": f"self.metadata.name.matches('{api.NAME_PATTERN}')",
        "message": "metadata.name must start with a letter and contain only a-z, 0-9 and '-' "
        "(it names the client Service)",
    },
]

PRINTER_COLUMNS = [
    {"name": "TP", "type": "integer", "jsonPath": ".status.plan.tensor", "description": "Tensor-parallel size"},
    {"name": "PP", "type": "integer", "jsonPath": ".status.plan.pipeline", "description": "Pipeline stages"},
    {"name": "REPLICAS", "type": "integer", "jsonPath": ".spec.replicas", "description": "Rank groups wanted"},
    {"name": "READY", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Rank groups ready"},
    {"name": "PHASE", "type": "string", "jsonPath": ".status.phase"},
    {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref, keeping sibling keys (description, default) of the referring node."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return _resolve(merged, defs)


def _is_int_or_auto(branches: list[dict[str, Any]]) -> bool:
    types = sorted(b.get("type", "") for b in branches)
    return types == ["integer", "string"] and any(b.get("const") == "auto" for b in branches)


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node (and its children) to a structural CRD schema."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"]]
        non_null = [b for b in branches if b.get("type") != "null"]
        if _is_int_or_auto(non_null):
            # int | 'auto': the CEL rules on the parent check the string is exactly 'auto'.
            out["x-kubernetes-int-or-string"] = True
        elif len(non_null) == 1:
            out.update(structural(non_null[0], defs))
        else:
            raise ValueError(f"cannot express anyOf {node['anyOf']} in a structural schema")
        if len(non_null) < len(branches):
            out["nullable"] = True
    for key, value in node.items():
        if key in _DROP_KEYS or key in ("anyOf", "$ref"):
            continue
        if key == "properties":
            out["properties"] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs)
            # `false` is how pydantic forbids extra fields; the API server prunes them instead.
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default":
            if value is not None:
                out["default"] = value
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, prop in out["properties"].items():
            # Optional sub-objects get `{}` so their own defaults (and CEL on them) apply; a
            # nullable one (`X | None = None`) means "absent", so it stays absent.
            if (
                prop.get("type") == "object"
                and "properties" in prop
                and name not in required
                and not prop.get("nullable")
            ):
                prop.setdefault("default", {})
    return out


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the LargeModel CRD."""
    spec_schema = api.LargeModelSpec.model_json_schema(by_alias=True)
    status_schema = api.LargeModelStatus.model_json_schema(by_alias=True)
    spec = structural(spec_schema, spec_schema.get("$defs", {}))
    status = structural(status_schema, status_schema.get("$defs", {}))
    return {
        "type": "object",
        "description": "A large language model served across GPUs and nodes with tensor and pipeline parallelism.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": ROOT_RULES,
    }


def generate_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "largemodel"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML file in crds/ (a test checks they are identical)."""
    header = "# Generated by `largemodel crd` from operator/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(generate_crd(), sort_keys=False, width=100)
