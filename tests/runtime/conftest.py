"""Fixtures shared by the runtime tests: tiny checkpoints built once per session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import tiny_models


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every tiny variant saved with transformers, plus transformers' own greedy output for the prompts."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_models.build_all(root)
    return json.loads((root / "reference.json").read_text())


@pytest.fixture(scope="session")
def seeded_single_process(checkpoints: dict[str, Any]) -> dict[str, Any]:
    """Seeded sampling by the native engine on tp=1, pp=1 in this process: what every split must reproduce."""
    from world_main import drive

    from largemodel.runtime.engine import Engine, SamplingParams
    from largemodel.runtime.parallel import ParallelContext
    from largemodel.runtime.weights import build_stage

    run = tiny_models.SAMPLINGS["seeded"]
    out = {}
    for v in tiny_models.VARIANTS:
        model, _ = build_stage(Path(checkpoints["models"][v.name]["dir"]), ParallelContext(), torch.float32,
                               torch.device("cpu"), 4, 64)
        out[v.name] = drive(Engine(model, ParallelContext()), checkpoints["prompts"], run["new_tokens"],
                            SamplingParams(**run["params"]))["tokens"]
    return out
