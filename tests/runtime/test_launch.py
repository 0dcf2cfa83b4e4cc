"""`largemodel rank` as the operator's pods run it: serve, stop cleanly, and die together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pods import group_env, running_pods
from rank_world import child_env
from tiny_models import word


def _rank(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "largemodel.operator.cli", "rank"], env=child_env(env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(90)
def test_bad_env_is_a_clear_error_naming_the_variable(checkpoints: dict[str, Any]) -> None:
    """A missing or inconsistent variable exits 2 with one line that names it, no traceback."""
    env = group_env(Path(checkpoints["models"]["gqa"]["dir"]), tp=2, pp=1, NODE_RANK="0")
    missing = {k: v for k, v in env.items() if k != "MODEL_URI"}
    for bad, name in [(missing, "MODEL_URI"), ({**env, "NPROC_PER_NODE": "3"}, "NPROC_PER_NODE"),
                      ({**env, "MASTER_PORT": "http"}, "MASTER_PORT"), ({**env, "MAX_BATCH_SIZE": "x"}, "MAX_BATCH_SIZE")]:
        clean = {k: v for k, v in os.environ.items() if k not in env} | bad
        done = _rank(clean)
        assert done.returncode == 2, done.stderr
        assert name in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(150)
def test_group_serves_then_stops_cleanly(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """tp=2 x pp=2 as two pods: a completion equals transformers' greedy tokens; SIGTERM exits 0 everywhere."""
    model = checkpoints["models"]["gqa"]
    prompt = checkpoints["prompts"][0]
    with running_pods(group_env(Path(model["dir"]), tp=2, pp=2), tmp_path) as pods:
        body = {"model": "tiny", "prompt": " ".join(map(word, prompt)), "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{pods.http_url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].split() == [word(t) for t in model["tokens"][0][:8]]
        for port in pods.metrics_ports:
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            # the readiness probe the builders give every pod: /readyz on the metrics port
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
        scrape = httpx.get(f"http://127.0.0.1:{pods.metrics_ports[1]}/metrics", timeout=5).text
        assert 'largemodel_collective_calls_total{backend="gloo",group="tp",op="all_reduce"}' in scrape
        assert 'group="pp",op="recv"' in scrape and "largemodel_model_load_seconds" in scrape
        assert scrape.count("largemodel_rank_info{") == 2  # both local ranks of the stage-1 pod
        pods.procs[0].send_signal(signal.SIGTERM)
        codes = pods.wait_exit(60)
        assert codes == [0, 0], f"exit codes {codes}\n{pods.tail()}"


@pytest.mark.timeout(150)
def test_killed_rank_stops_the_whole_group_non_zero(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL one worker rank of the stage-1 pod: both pods exit non-zero within seconds, nothing hangs."""
    model = checkpoints["models"]["gqa"]
    with running_pods(group_env(Path(model["dir"]), tp=2, pp=2), tmp_path) as pods:
        victim = pods.rank_pids(1)[1]
        survivors = pods.rank_pids(0) + pods.rank_pids(1)[:1]
        os.kill(victim, signal.SIGKILL)
        codes = pods.wait_exit(30)
        assert all(c not in (None, 0) for c in codes), f"exit codes {codes}\n{pods.tail()}"
        for pid in survivors:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


def test_pod_readiness_waits_for_the_group_and_on_stage_0_for_the_server() -> None:
    """/readyz on the metrics port: 503 until the group joined; stage 0 also until its server serves."""
    from largemodel.runtime.rank import PodReadiness

    worker, leader = PodReadiness(needs_server=False), PodReadiness(needs_server=True)
    assert not worker.ready()[0] and not leader.ready()[0]
    worker.joined.set()
    leader.joined.set()
    assert worker.ready()[0]
    assert not leader.ready()[0]  # joined, but nothing listens yet
    serving = [True]
    leader.publish_serving(lambda: serving[0])
    assert leader.ready()[0]
    serving[0] = False  # draining after SIGTERM
    assert leader.ready() == (False, "group joined; server not listening yet, or draining")
