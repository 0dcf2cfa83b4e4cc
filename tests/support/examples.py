"""Shared test helpers: example resources and the real `largemodel` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from largemodel.operator import api
from tests.support.paths import REPO

EXAMPLES = REPO / "examples"
LARGEMODEL = Path(sys.executable).parent / "largemodel"

LLAMA3_70B = {
    "numAttentionHeads": 64,
    "numKeyValueHeads": 8,
    "numHiddenLayers": 80,
    "hiddenSize": 8192,
    "intermediateSize": 28672,
    "vocabSize": 128256,
    "parameters": 70553706496,
}
LLAMA31_405B = {
    "numAttentionHeads": 128,
    "numKeyValueHeads": 8,
    "numHiddenLayers": 126,
    "hiddenSize": 16384,
    "intermediateSize": 53248,
    "vocabSize": 128256,
    "parameters": 405853388800,
}


def example(name: str) -> dict[str, Any]:
    """An examples/ file as a dict."""
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return body


def make_lm(spec: dict[str, Any], name: str = "m", namespace: str = "default", uid: str = "") -> api.LargeModel:
    """A LargeModel from a spec dict."""
    return api.LargeModel.model_validate(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": spec,
        }
    )


def run_largemodel(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a user would."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run(
        [str(LARGEMODEL), *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
