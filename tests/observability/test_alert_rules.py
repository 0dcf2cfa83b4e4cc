"""The alert rules pass promtool, each alert is unit tested firing and silent, and the tests can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from largemodel import metrics
from tests.support.metricnames import exported_sample_names, metric_names_in
from tests.support.paths import REPO

FILES = REPO / "charts" / "largemodel" / "files"
RULES = FILES / "alerts.rules.yaml"
RULE_TESTS = FILES / "alerts.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/setup.sh dev installs it")


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args: str, cwd: Path = FILES) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist_with_runbooks() -> None:
    alerts = {rule["alert"]: rule for rule in _alerts()}
    for required in (
        "LargeModelTTFTHigh",
        "LargeModelCollectiveLatencyRegression",
        "LargeModelGroupsUnavailable",
        "LargeModelRestartBudgetExhausted",
        "LargeModelQueueSaturated",
        "LargeModelKVCacheExhausted",
    ):
        assert required in alerts, f"missing alert {required}"
    for name, rule in alerts.items():
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name} has no {key} annotation"
        assert "\n" not in annotations["runbook"].strip(), f"{name}: runbook must be one line"
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, name


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tested: dict[str, set[str]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            tested.setdefault(case["alertname"], set()).add("firing" if case.get("exp_alerts") else "silent")
    for rule in _alerts():
        assert tested.get(rule["alert"]) == {"firing", "silent"}, f"{rule['alert']}: {tested.get(rule['alert'])}"


def test_rules_use_only_declared_metrics_and_label_values() -> None:
    known = exported_sample_names()
    text = RULES.read_text()
    for rule in _alerts():
        used = metric_names_in(rule["expr"])
        assert used, f"{rule['alert']} uses no largemodel metric"
        assert used <= known, f"{rule['alert']} uses undeclared {sorted(used - known)}"
    # Label values the rules select on are the ones the instrumenting code is told to write.
    assert set(re.findall(r'status="(\w+)"', text)) <= set(metrics.REQUEST_STATUSES)
    assert set(re.findall(r'state!?="(\w+)"', text)) <= set(metrics.GROUP_STATES)


def _tests_of(name: str) -> dict[str, Any]:
    """alerts.test.yaml cut down to the test groups and cases about alert `name` (keeps promtool quick)."""
    document = yaml.safe_load(RULE_TESTS.read_text())
    groups = []
    for group in document["tests"]:
        cases = [case for case in group.get("alert_rule_test", []) if case["alertname"] == name]
        if cases:
            groups.append({**group, "alert_rule_test": cases})
    return {**document, "tests": groups}


def _promtool_test_in(directory: Path, rules: dict[str, Any], tests: dict[str, Any]) -> bool:
    directory.mkdir()
    (directory / RULES.name).write_text(yaml.safe_dump(rules))
    (directory / RULE_TESTS.name).write_text(yaml.safe_dump(tests))
    return _promtool("test", "rules", RULE_TESTS.name, cwd=directory).returncode == 0


def _with_expr(name: str, expr: str) -> dict[str, Any]:
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                rule["expr"] = expr
    return document


@needs_promtool
def test_rule_unit_tests_catch_a_broken_alert(tmp_path: Path) -> None:
    """Each alert's own unit tests pass on the real rules and fail when its expression never or
    always fires: no test is vacuous."""
    cases = []
    for name in [rule["alert"] for rule in _alerts()]:
        tests = _tests_of(name)
        cases.append((name, "intact", True, yaml.safe_load(RULES.read_text()), tests))
        cases.append((name, "never-fires", False, _with_expr(name, "vector(0) > 1"), tests))
        cases.append((name, "always-fires", False, _with_expr(name, "vector(1)"), tests))
    with ThreadPoolExecutor(max_workers=2) as pool:
        passed = list(pool.map(lambda c: _promtool_test_in(tmp_path / f"{c[0]}-{c[1]}", c[3], c[4]), cases))
    wrong = [f"{name} {variant}: unit tests {'pass' if ok else 'fail'}"
             for (name, variant, expected, _, _), ok in zip(cases, passed, strict=True) if ok != expected]
    assert not wrong, "\n".join(wrong)
