"""Operator benchmark: apply N LargeModels with kubectl and time the operator against a mock API server.

Measures, for each N: seconds from `kubectl apply` returning to all children created (N group
StatefulSets + 2N Services), to all N LargeModels Ready (the test kubelet marks pods Ready as soon
as they exist), reconcile passes and API writes until then (writes per pass), and the writes of
a steady-state round where every LargeModel is poked (a label edit) and reconciled again.

The API server is tests/operator's K8sMock (kmock) in this process, the operator is the real one
(kopf's KopfRunner, another thread), kubectl is the real binary. Every loop is bounded in time.

    PYTHONSAFEPATH=1 .venv/bin/python bench/operator_bench.py --models 1 50 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test helpers, as the suite imports them

from tests.support.kubelet import Kubelet  # noqa: E402
from tests.support.mockcluster import MockCluster, lm_path, running_cluster  # noqa: E402
from tests.support.operatorrun import operator_requests, operator_writes, running_operator  # noqa: E402

NS = "models"
EXAMPLE = ROOT / "examples" / "smollm2-local.yaml"
TIMEOUT = 300.0


def _until(check: Any, what: str, timeout: float = TIMEOUT) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def _live(cluster: MockCluster, plural: str) -> int:
    return sum(1 for (res, ns, _), obj in cluster.mock.objects.items()
               if res.plural == plural and ns == NS and not obj.deleted)


def _passes(cluster: MockCluster, names: set[str]) -> int:
    # Every pass starts with one GET of its LargeModel.
    return sum(1 for r in operator_requests(cluster)
               if str(r.method.value) == "GET" and r.name in names and r.resource.plural == "largemodels")


def run_one(models: int, workdir: Path) -> dict[str, Any]:
    """Apply `models` LargeModels at once; time and count until all are Ready, then a steady round."""
    docs = []
    for i in range(models):
        body = yaml.safe_load(EXAMPLE.read_text())
        body["metadata"]["name"] = f"m{i:03d}"
        docs.append(yaml.safe_dump(body))
    manifest = workdir / f"models-{models}.yaml"
    manifest.write_text("---\n".join(docs))
    names = {f"m{i:03d}" for i in range(models)}
    with running_cluster(workdir, [NS]) as cluster, Kubelet(cluster, [NS]), running_operator(cluster, [NS]):
        started = time.monotonic()
        cluster.kubectl("apply", "--validate=false", "-n", NS, "-f", str(manifest))
        applied = time.monotonic()
        children = _until(lambda: _live(cluster, "statefulsets") == models and _live(cluster, "services") == 2 * models,
                          "all children created")

        def all_ready() -> bool:
            items = cluster.list(lm_path(NS))
            return len(items) == models and all((m.get("status") or {}).get("phase") == "Ready" for m in items)

        ready = _until(all_ready, "all Ready")
        time.sleep(1.0)  # let the passes that Ready itself triggered finish
        passes, writes = _passes(cluster, names), len(operator_writes(cluster))
        kinds: dict[str, int] = {}
        for r in operator_writes(cluster):
            key = f"{r.method.value} {r.resource.plural}{'/' + r.subresource if r.subresource else ''}"
            kinds[key] = kinds.get(key, 0) + 1
        for name in names:
            cluster.patch(lm_path(NS, name), {"metadata": {"labels": {"bench-poke": "1"}}})
        _until(lambda: _passes(cluster, names) >= passes + models, "a steady-state pass of every model")
        time.sleep(1.0)
        steady_passes = _passes(cluster, names) - passes
        steady_writes = len(operator_writes(cluster)) - writes
    return {
        "models": models,
        "kubectl_apply_seconds": round(applied - started, 3),
        "apply_start_to_children_seconds": round(children - started, 3),
        "apply_start_to_ready_seconds": round(ready - started, 3),
        "apply_done_to_children_seconds": round(max(children - applied, 0.0), 3),
        "passes_to_ready": passes,
        "writes_to_ready": writes,
        "writes_per_pass": round(writes / passes, 2) if passes else None,
        "writes_by_kind": dict(sorted(kinds.items())),
        "steady_passes": steady_passes,
        "steady_writes": steady_writes,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each --models count and print a table (and JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.models:
            workdir = Path(tmp) / str(count)
            workdir.mkdir()
            results.append(run_one(count, workdir))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
