"""Fixtures of the serving tests: a tiny checkpoint and one shared pp=2 rank group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_models import build_tiny_llama
from tests.support.world import RunningServer, start_run, write_largemodel


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Llama with a trained BPE tokenizer and a ChatML template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One pp=2 rank group shared by the API tests (maxBatchSize 8, maxQueue 24, maxModelLen 128)."""
    tmp = tmp_path_factory.mktemp("run")
    lm_file = write_largemodel(tmp / "tiny.yaml", "tiny", tiny_model)
    # One micro-batch token is enough to open a lane: the API tests then run with two lanes in the
    # pipeline at once (stages overlapping across steps), the path pp on separate GPUs takes.
    # The OpenAPI document is off by default; the schemathesis test reads it, so this server opts in.
    # Short read timeouts let the hardening tests watch slow clients being cut off in seconds.
    running = start_run(lm_file, tmp / "run.log", env={
        "LARGEMODEL_MIN_MICRO_BATCH_TOKENS": "1", "LARGEMODEL_API_DOCS": "1",
        "LARGEMODEL_HTTP_HEADER_TIMEOUT_S": "2", "LARGEMODEL_HTTP_BODY_TIMEOUT_S": "2",
    })
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"largemodel run exited {code}:\n{running.log_text()[-4000:]}"
