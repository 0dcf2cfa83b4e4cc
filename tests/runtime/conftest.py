"""Fixtures shared by the runtime tests: tiny checkpoints built once per session."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every tiny variant saved with transformers, plus transformers' own greedy output for the prompts."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_models.build_all(root)
    return json.loads((root / "reference.json").read_text())
