"""Fixtures of the operator tests: a running mock API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mockcluster import MockCluster, running_cluster

NAMESPACES = ["models", "other"]


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[MockCluster]:
    """A fresh K8sMock on 127.0.0.1 with the LargeModel CRD, apps, core and events declared."""
    with running_cluster(tmp_path, NAMESPACES) as running:
        yield running
