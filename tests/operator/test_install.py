"""A normal (non-editable) install imports the same packages as the editable one the suite runs on."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.paths import REPO


def test_wheel_maps_operator_and_runtime_under_largemodel(tmp_path: Path) -> None:
    """The wheel holds largemodel/{operator,runtime}, the .proto and the kernel source, and imports from a plain site dir."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, env=env, cwd=tmp_path, timeout=180,
    )
    (wheel,) = tmp_path.glob("largemodel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("largemodel/__init__.py", "largemodel/envcontract.py", "largemodel/operator/api.py",
                     "largemodel/operator/cli.py", "largemodel/runtime/engine.py", "largemodel/runtime/largemodel.proto",
                     "largemodel/runtime/cpu_kernels.cpp"):
        assert expected in names, expected
    assert not any(n.startswith(("operator/", "runtime/", "tests/")) for n in names), "stray top-level packages"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    probe = (
        "import largemodel, largemodel.operator.api as api, largemodel.operator.planner, largemodel.runtime.engine;"
        "import operator; assert hasattr(operator, 'itemgetter');"  # the stdlib module is not shadowed
        "print(api.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path, timeout=120)
    assert out.stdout.strip().startswith(str(site)), out.stdout
