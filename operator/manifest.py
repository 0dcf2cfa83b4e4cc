"""Reading LargeModel manifests: files, stdin and API objects, with one-line errors naming each bad field.

Shared by the CLI (`plan`, `render`, `run`) and the operator's reconcile, which must not import the CLI.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from largemodel.operator import api


class InputError(ValueError):
    """A user's file is missing or wrong; the message is one line that names the problem."""


# Union branches show up in error locations as tags like "constrained-int" or "literal['auto']".
_UNION_TAG = re.compile(r"^(constrained-\w+|literal\[.*\]|function-\w+\[.*\]|int|str|float|bool)$")


def _clean_loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or "(document)"


def describe_validation_error(err: ValidationError) -> str:
    """One line naming each bad field of a LargeModel, e.g. `spec.parallelism.tensr: unknown field`."""
    by_loc: dict[str, list[str]] = {}
    for item in err.errors():
        loc = _clean_loc(item["loc"])
        msg = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        msg = msg.removeprefix("Value error, ")
        msg = msg[0].lower() + msg[1:] if msg else msg
        by_loc.setdefault(loc, [])
        if msg not in by_loc[loc]:
            by_loc[loc].append(msg)
    return "; ".join(f"{loc}: {' or '.join(msgs)}" for loc, msgs in by_loc.items())


def parse_largemodel(body: Any, source: str) -> api.LargeModel:
    """Check kind and apiVersion, then validate; InputError names the first problem."""
    if not isinstance(body, dict):
        raise InputError(f"{source}: expected a LargeModel mapping, got {type(body).__name__}")
    kind, version = body.get("kind"), body.get("apiVersion")
    if kind != api.KIND:
        raise InputError(f"{source}: kind is {kind!r}, expected {api.KIND!r}")
    if version != api.API_VERSION:
        raise InputError(f"{source}: apiVersion is {version!r}, expected {api.API_VERSION!r}")
    try:
        return api.LargeModel.from_manifest(body)
    except ValidationError as err:
        raise InputError(f"{source}: {describe_validation_error(err)}") from None


def load_largemodel(path: str) -> api.LargeModel:
    """Read one LargeModel from a YAML/JSON file (`-` is stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a LargeModel YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None
    if len(docs) != 1:
        raise InputError(f"{path}: expected exactly one LargeModel document, found {len(docs)}")
    return parse_largemodel(docs[0], path)
