"""Two "nodes": pp=2 with each stage pod in its own network namespace, joined by a veth pair.

This is how two pods on two nodes see each other: different addresses, traffic over a real
interface (GLOO_SOCKET_IFNAME), the stage-0 pod's address as MASTER_ADDR.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.pods import group_env, running_pods
from tests.support.tiny_models import word


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def two_nodes() -> Iterator[list[tuple[str, str, str]]]:
    """[(namespace, interface, address)] for two namespaces joined by a veth pair; removed afterwards."""
    tag = f"{os.getpid() % 100000}"
    nodes = [(f"lmns{tag}a", f"lmv{tag}a", "10.231.7.1"), (f"lmns{tag}b", f"lmv{tag}b", "10.231.7.2")]
    try:
        _ip("netns", "add", nodes[0][0])
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        reason = getattr(exc, "stderr", "") or str(exc)
        print(f"SKIP two-node test: cannot create a network namespace: {reason.strip()}")
        pytest.skip(f"cannot create network namespaces here: {reason.strip()}")
    try:
        _ip("netns", "add", nodes[1][0])
        _ip("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])
        for ns, dev, addr in nodes:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns, _dev, _addr in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)  # takes its veth end along


def _in_ns(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(150)
def test_pipeline_across_two_network_namespaces(two_nodes: list[tuple[str, str, str]],
                                                checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """Stage 0 in one namespace, stage 1 in the other: greedy completion equals transformers; clean stop."""
    (ns0, dev0, addr0), (ns1, dev1, _addr1) = two_nodes
    model = checkpoints["models"]["mqa"]
    env = group_env(Path(model["dir"]), tp=1, pp=2, MASTER_ADDR=addr0, BIND_HOST="0.0.0.0")
    port = env["HTTP_PORT"]
    with running_pods(env, tmp_path, prefix=[["ip", "netns", "exec", ns0], ["ip", "netns", "exec", ns1]],
                      per_stage=[{"GLOO_SOCKET_IFNAME": dev0}, {"GLOO_SOCKET_IFNAME": dev1}],
                      wait_ready=False) as pods:
        deadline = time.monotonic() + 90
        # Ask from the other "node", as a client outside the stage-0 pod would.
        while _in_ns(ns1, "curl", "-sf", f"http://{addr0}:{port}/readyz").returncode != 0:
            assert all(p.poll() is None for p in pods.procs), pods.tail()
            assert time.monotonic() < deadline, f"not ready\n{pods.tail()}"
            time.sleep(0.5)
        body = {"model": "tiny", "prompt": " ".join(map(word, checkpoints["prompts"][1])), "max_tokens": 6,
                "temperature": 0}
        reply = _in_ns(ns1, "curl", "-sf", f"http://{addr0}:{port}/v1/completions", "-H",
                       "content-type: application/json", "-d", json.dumps(body))
        assert reply.returncode == 0, reply.stderr + pods.tail()
        text = json.loads(reply.stdout)["choices"][0]["text"]
        assert text.split() == [word(t) for t in model["tokens"][1][:6]]
        assert "liveness_connected master=10.231.7.1" in pods.tail()
        pods.procs[0].send_signal(signal.SIGTERM)
        assert pods.wait_exit(60) == [0, 0], pods.tail()
