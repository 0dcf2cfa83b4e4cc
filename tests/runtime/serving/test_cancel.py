"""A client that goes away frees its batch slot: HTTP stream closed early, non-streamed HTTP request
abandoned, gRPC call cancelled."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable

import grpc
import httpx

from largemodel.runtime.grpc_server import load_stubs
from tests.support.world import RunningServer

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


def _abandon_until_cancelled(server: RunningServer, label: str, abandon: Callable[[], None]) -> None:
    """Run `abandon` (a client that leaves mid-request) until its request is counted cancelled.

    Each try must end as exactly one request, ok or cancelled: a tiny model can finish its ~100 tokens
    before the disconnect lands on a busy machine, so a few tries make sure one was still generating
    when its client left.
    """
    ok, cancelled = 'largemodel_requests_total{status="ok"}', 'largemodel_requests_total{status="cancelled"}'
    for _ in range(3):
        before = _wait_idle(server.base_url)
        abandon()
        after = _wait_idle(server.base_url)
        finished = after.get(ok, 0.0) - before.get(ok, 0.0)
        left = after.get(cancelled, 0.0) - before.get(cancelled, 0.0)
        assert (finished, left) in ((1, 0), (0, 1)), f"{label}: counted {finished} ok, {left} cancelled"
        if left:
            return
    raise AssertionError(f"{label}: every abandoned request ran to its end instead of being cancelled")


def test_disconnected_clients_free_their_slots(server: RunningServer) -> None:
    def close_http_stream() -> None:
        body = {"prompt": "long story", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=30) as client, \
                client.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # The stream was closed after one event, 99 tokens early.

    def cancel_grpc_call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = pb2_grpc.GenerationStub(channel).Generate(
                pb2.GenerateRequest(prompt="another long story", max_tokens=100, ignore_eos=True), timeout=30)
            assert next(call).token_ids
            call.cancel()

    _abandon_until_cancelled(server, "HTTP stream closed", close_http_stream)
    _abandon_until_cancelled(server, "gRPC call cancelled", cancel_grpc_call)


def _post_then_hang_up(server: RunningServer, path: str, body: dict[str, object]) -> None:
    """POST a non-streamed request on a raw socket and close it, unread, as soon as it is in flight."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    # /readyz on a kept-alive connection is the cheapest way to see the request admitted: the
    # sooner the socket closes, the more of its ~100 tokens are left to cancel.
    with httpx.Client(base_url=server.base_url, timeout=10) as probe, \
            socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + 30
        while probe.get("/readyz").json().get("in_flight", 0) < 1:
            assert time.monotonic() < deadline, "the request was never admitted"


def test_non_streamed_clients_that_leave_free_their_slots(server: RunningServer) -> None:
    chat = [{"role": "user", "content": "story"}]
    for path, body in (("/v1/completions", {"prompt": "story", "max_tokens": 120, "ignore_eos": True}),
                       ("/v1/chat/completions", {"messages": chat, "max_tokens": 100, "ignore_eos": True})):
        _abandon_until_cancelled(server, path, lambda path=path, body=body: _post_then_hang_up(server, path, body))
    # The freed slots serve the next client.
    resp = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "next", "max_tokens": 3,
                                                                  "ignore_eos": True}, timeout=30)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
