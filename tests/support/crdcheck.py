"""What the API server does with a custom resource before storing it, done with real libraries.

Order as in kube-apiserver: apply schema defaults, validate against the structural schema
(OpenAPI v3, here with jsonschema; unknown fields are errors as with kubectl's default strict
field validation), then evaluate every `x-kubernetes-validations` CEL rule (here with cel-python)
on each node whose value is present.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
from celpy import celtypes


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (Kubernetes dialect) -> JSON Schema draft 4 that jsonschema evaluates."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = to_jsonschema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = to_jsonschema(value)
        elif key in ("x-kubernetes-int-or-string", "x-kubernetes-validations", "nullable"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill `default`s the way the API server does: recursively, into present or defaulted objects."""
    if not isinstance(value, dict) or "properties" not in schema:
        if isinstance(value, list) and "items" in schema:
            return [apply_defaults(schema["items"], item) for item in value]
        return value
    out = dict(value)
    for name, prop in schema["properties"].items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(prop, out[name])
    return out


def rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every CEL rule of the schema with the path of the node it sits on."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or ".", rule
    for name, prop in schema.get("properties", {}).items():
        yield from rules(prop, f"{path}.{name}")
    if "items" in schema:
        yield from rules(schema["items"], f"{path}[]")


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Messages of the CEL rules that fail on `value` (evaluated where the value is present)."""
    failures: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        # Anything but a true bool (false, or an evaluation error) fails the rule, as in the API server.
        if not (isinstance(result, celtypes.BoolType) and bool(result)):
            failures.append(f"{path or '.'}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value and value[name] is not None:
                failures += cel_failures(prop, value[name], f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def admit(openapi: dict[str, Any], resource: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(defaulted resource, errors): schema errors, then CEL rule failures, as the API server reports."""
    defaulted = apply_defaults(openapi, resource)
    validator = jsonschema.Draft4Validator(to_jsonschema(openapi))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(defaulted)]
    if errors:
        return defaulted, errors
    return defaulted, cel_failures(openapi, defaulted)
