"""A client that goes away frees its batch slot: HTTP stream closed early, gRPC call cancelled."""

from __future__ import annotations

import time
import urllib.request

import grpc
import httpx

from largemodel.runtime.grpc_server import load_stubs

from .world import RunningServer

pb2, pb2_grpc = load_stubs()


def _metrics(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line and not line.startswith("#")}


def _wait_idle(base_url: str) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sample = _metrics(base_url)
        if sample["largemodel_requests_running"] == 0 and sample["largemodel_requests_waiting"] == 0:
            return sample
        time.sleep(0.1)
    raise AssertionError(f"requests still running 30 s after their clients left: {sample}")


def test_disconnected_clients_free_their_slots(server: RunningServer) -> None:
    cancelled = 'largemodel_requests_total{status="cancelled"}'
    before = _wait_idle(server.base_url).get(cancelled, 0.0)
    body = {"prompt": "long story", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The stream was closed after one event, 99 tokens early.
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb2_grpc.GenerationStub(channel).Generate(
            pb2.GenerateRequest(prompt="another long story", max_tokens=100, ignore_eos=True), timeout=30)
        assert next(call).token_ids
        call.cancel()
    after = _wait_idle(server.base_url)
    assert after[cancelled] - before == 2
