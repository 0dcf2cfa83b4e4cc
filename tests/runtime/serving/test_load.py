"""Bounded load on 127.0.0.1: more streams than slots + queue; overflow gets 429, the rest all finish."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import httpx

from tests.support.world import RunningServer

STREAMS = 64  # twice maxBatchSize (8) + maxQueue (24)
NEW_TOKENS = 24


async def _stream(client: httpx.AsyncClient, i: int) -> tuple[int, dict[str, object]]:
    body = {"prompt": f"request {i}:", "max_tokens": NEW_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, {"body": resp.json(), "retry_after": resp.headers.get("retry-after")}
        events = [line[len("data: "):] async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    parsed = [json.loads(e) for e in events[:-1]]
    finish = [c["finish_reason"] for p in parsed for c in p["choices"] if c["finish_reason"]]
    return 200, {"finish": finish, "usage": parsed[-1]["usage"]}


async def _burst(base_url: str) -> list[tuple[int, dict[str, object]]]:
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, i) for i in range(STREAMS)))


def _metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_overflow_is_429_and_every_accepted_stream_completes(server: RunningServer) -> None:
    results: list[tuple[int, dict[str, object]]] = []
    # Whether the queue overflows depends on how fast the first streams finish; three bursts are
    # plenty on any machine, and every burst is bounded by the client timeout.
    for _ in range(3):
        results = asyncio.run(asyncio.wait_for(_burst(server.base_url), 300))
        if any(status == 429 for status, _ in results):
            break
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and statuses.count(200) >= 32
    for status, info in results:
        if status == 200:
            assert info["finish"] == ["length"]
            assert info["usage"]["completion_tokens"] == NEW_TOKENS  # type: ignore[index]
        else:
            assert info["retry_after"] is not None and int(str(info["retry_after"])) >= 1
            assert info["body"]["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert _metric(server.base_url, "largemodel_requests_running") == 0
    assert _metric(server.base_url, "largemodel_requests_waiting") == 0
    assert _metric(server.base_url, 'largemodel_requests_total{status="rejected"}') >= statuses.count(429)
