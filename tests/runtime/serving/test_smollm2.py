"""The main job: `largemodel run` builds SmolLM2-135M-Instruct from its GGUF and answers through the API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-scoped models root: SmolLM2 is converted into it once per test session."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.slow
def test_smollm2_says_paris(models_dir: Path) -> None:
    env = {**os.environ, "LARGEMODEL_MODELS_DIR": str(models_dir), "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "largemodel.operator.cli", "run", "-f", str(REPO / "examples/smollm2-local.yaml"),
           "--prompt", "What is the capital of France?", "--max-tokens", "24", "--port", "0", "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=models_dir)
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            from tests.support.world import kill_process_tree

            kill_process_tree(proc)  # type: ignore[arg-type]
    assert proc.returncode == 0, err[-5000:]
    assert "Paris" in out, out + err[-3000:]
    assert "model.build done" in err  # the conversion ran and said so
    assert (models_dir / "HuggingFaceTB/SmolLM2-135M-Instruct/model.safetensors").is_file()
