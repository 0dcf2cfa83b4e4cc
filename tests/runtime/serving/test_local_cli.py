"""`largemodel run` refuses bad input with one clear line and exit code 2, before starting any rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import REPO


def _run(*args: str, models_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "LARGEMODEL_MODELS_DIR": str(models_dir)}
    return subprocess.run([sys.executable, "-m", "largemodel.operator.cli", "run", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _smollm2_with(tmp_path: Path, **spec: object) -> Path:
    doc = yaml.safe_load((REPO / "examples/smollm2-local.yaml").read_text())
    doc["spec"].update(spec)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda tmp: ["-f", str(tmp / "missing.yaml")], "no such file"),
        (lambda tmp: ["-f", str(_smollm2_with(tmp, parallelism={"tensor": 2, "pipeline": 1}))], "valid tensor sizes: 1, 3"),
        (lambda tmp: ["-f", str(_smollm2_with(tmp, model={"uri": "hf://nobody/nothing", "dtype": "float32"}))],
         "not found"),
        (lambda tmp: ["-f", str(REPO / "examples/smollm2-local.yaml"), "--max-tokens", "0"], "--max-tokens"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, make_args, needle: str) -> None:  # type: ignore[no-untyped-def]
    result = _run(*make_args(tmp_path), models_dir=tmp_path / "models")
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_port_is_reported_before_starting_ranks(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        lm = _smollm2_with(tmp_path, model={"uri": "file:///nonexistent-but-unused", "dtype": "float32",
                                            "architecture": yaml.safe_load(
                                                (REPO / "examples/smollm2-local.yaml").read_text()
                                            )["spec"]["model"]["architecture"]})
        result = _run("-f", str(lm), "--port", str(port), models_dir=tmp_path / "models")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
