"""Read Grafana dashboard JSON the way Grafana does: panels, their PromQL, template variables."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.paths import REPO

DASHBOARD_DIR = REPO / "charts" / "largemodel" / "files" / "dashboards"

# Grafana's built-in interval variables; a test substitutes one window that spans its whole run.
_BUILTIN_INTERVALS = ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}", "$__range")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        """Readable id for test output: dashboard / panel / refId."""
        return f"{self.dashboard}/{self.panel}/{self.ref_id}"


@dataclass(frozen=True)
class QueryVariable:
    """A `label_values(match, label)` template variable."""

    name: str
    label: str
    match: str | None
    all_value: str | None


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """File stem -> parsed dashboard, for every *.json in `directory`."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(name: str, dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every PromQL expression the dashboard's panels run (rows carry none)."""
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            queries.append(PanelQuery(name, str(panel.get("title")), str(target.get("refId")), target["expr"]))
    return queries


def query_variables(dashboard: Mapping[str, Any]) -> list[QueryVariable]:
    """The dashboard's query variables in declaration order (later ones may use earlier ones)."""
    variables = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        parsed = _LABEL_VALUES.match(text)
        if parsed is None:
            raise ValueError(f"variable {variable['name']}: only label_values(...) is supported, got {text!r}")
        variables.append(
            QueryVariable(
                name=variable["name"],
                label=parsed["label"],
                match=parsed["match"],
                all_value=variable.get("allValue") if variable.get("includeAll") else None,
            )
        )
    return variables


def substitute(expr: str, values: Mapping[str, str], interval: str) -> str:
    """Replace Grafana interval macros with `interval` and $var / ${var} / [[var]] with `values`."""
    for macro in _BUILTIN_INTERVALS:
        expr = expr.replace(macro, interval)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"variable ${name} has no value (known: {sorted(values)}) in {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)
