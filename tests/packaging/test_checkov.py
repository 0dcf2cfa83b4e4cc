"""checkov finds no failed check in the rendered chart (every install) or in the Dockerfile.

A check the chart or Dockerfile skips must say why, in a checkov skip annotation or comment next to
what it excuses. checkov is slow to start, so it runs once for everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chartrender import CONFIGS, render_objects
from tests.support.paths import REPO

CHECKOV = REPO / ".venv" / "tools" / "checkov" / "bin" / "checkov"
# Every install the render tests cover, plus the one toggle they leave off.
SCANNED = {**CONFIGS, "secrets": {"rbac": {"readSecrets": True}}}


@pytest.fixture(scope="session")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} missing: run scripts/setup.sh dev")
    scan = tmp_path_factory.mktemp("checkov")
    for name, values in SCANNED.items():
        (scan / name).mkdir()
        for index, obj in enumerate(render_objects(values)):
            (scan / name / f"{index:02d}-{obj['kind'].lower()}.yaml").write_text(yaml.safe_dump(obj))
    shutil.copy(REPO / "Dockerfile", scan / "Dockerfile")
    # No network here: skip the guideline download and the package-vulnerability mapping.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_FILE_CACHE": "1"}
    result = subprocess.run(
        [str(CHECKOV), "-d", str(scan), "--framework", "kubernetes", "dockerfile", "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, timeout=240, env=env, cwd=scan,
    )
    # checkov exits 1 when a check fails; the report below says which.
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    return {report["check_type"]: report for report in (reports if isinstance(reports, list) else [reports])}


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_no_failed_checks(checkov_report: dict[str, dict[str, Any]], framework: str) -> None:
    report = checkov_report[framework]
    assert report["summary"]["parsing_errors"] == 0
    failed = [f"{c['check_id']} {c['check_name']} on {c['resource']} ({c['file_path']})"
              for c in report["results"]["failed_checks"]]
    assert failed == []


def test_every_skip_states_its_reason(checkov_report: dict[str, dict[str, Any]]) -> None:
    for report in checkov_report.values():
        for check in report["results"]["skipped_checks"]:
            reason = (check["check_result"].get("suppress_comment") or "").strip()
            assert len(reason) > 20 and reason != "No comment provided", (
                f"{check['check_id']} on {check['resource']} skipped without a reason"
            )


def test_checkov_scanned_every_install(checkov_report: dict[str, dict[str, Any]]) -> None:
    results = checkov_report["kubernetes"]["results"]
    checked = {Path(c["file_path"]).parts[1] for c in results["passed_checks"] + results["skipped_checks"]
               if c["resource"].startswith("Deployment.")}
    assert checked == set(SCANNED)
    assert checkov_report["dockerfile"]["summary"]["passed"] > 0
