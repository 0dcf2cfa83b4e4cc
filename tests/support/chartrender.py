"""Render charts/largemodel offline through the Helm v4 SDK (helm-python-sdk, no helm binary).

The tests of this folder all look at the chart through these functions, the way `helm template`
would show it to a user: the rendered templates as parsed objects, plus the CRDs Helm installs
from the chart's crds/ folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import helm_python
import yaml

from tests.support.paths import REPO

CHART_DIR = REPO / "charts" / "largemodel"
RELEASE = "lm"
NAMESPACE = "largemodel-system"
WATCHED = ["team-a", "team-b"]

_MONITORING_ON: dict[str, Any] = {
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "dashboards": {"enabled": True},
}

# The installs the tests render: defaults, every toggle on, and a namespaced install with every
# toggle on. Secrets access is its own toggle (tests/packaging/test_chart_rbac.py).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "everything": {
        **_MONITORING_ON,
        "image": {"digest": "sha256:" + "ab" * 32, "pullPolicy": "Always"},
        "operator": {"podAnnotations": {"example.com/team": "ml"}, "priorityClassName": "high-priority"},
    },
    "namespaced": {**_MONITORING_ON, "watch": {"allNamespaces": False, "namespaces": WATCHED}},
}


def render(
    values: dict[str, Any] | None = None, chart_dir: Path = CHART_DIR, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template RELEASE CHART -n NAMESPACE` produces."""
    with helm_python.Chart.load(chart_dir) as chart:
        return chart.render(values=values, name=RELEASE, namespace=namespace, is_install=True)


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of every rendered template (NOTES.txt and empty documents left out)."""
    objects: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return objects


def chart_crds(chart_dir: Path = CHART_DIR) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions Helm installs from the chart's crds/ folder."""
    with helm_python.Chart.load(chart_dir) as chart:
        return [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]


def render_objects(values: dict[str, Any] | None = None, chart_dir: Path = CHART_DIR) -> list[dict[str, Any]]:
    """Templates and CRDs together: everything an install of these values creates."""
    return chart_crds(chart_dir) + parse_manifests(render(values, chart_dir))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind, in rendering order."""
    return [obj for obj in objects if obj.get("kind") == kind]


def copy_chart(destination: Path) -> Path:
    """A scratch copy of the chart, for tests that change its files (dashboards, alert rules)."""
    target = destination / "largemodel"
    shutil.copytree(CHART_DIR, target)
    return target
