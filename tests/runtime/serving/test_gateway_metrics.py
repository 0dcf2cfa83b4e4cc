"""The model-server protocol metrics of the Gateway API Inference Extension, scraped from a running server.

TotalQueuedRequests (largemodel_requests_waiting), TotalRunningRequests (largemodel_requests_running)
and KVCacheUtilization (largemodel_kv_cache_usage_ratio, 0..1) must mean what the protocol says while
more requests are in flight than the server has batch slots (maxBatchSize 8); the prefix-cache counters
are exported as counters.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import httpx

from tests.support.world import RunningServer

STREAMS = 16  # twice maxBatchSize: half of them must wait
SLOTS = 8
NEW_TOKENS = 64


def _scrape(base_url: str) -> tuple[dict[str, float], dict[str, str]]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")}
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line and not line.startswith("#")}
    return values, types


async def _load(base_url: str) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    body = {"prompt": "a long story", "max_tokens": NEW_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=240,
                                 limits=httpx.Limits(max_connections=STREAMS + 1)) as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(STREAMS)]
        while not all(t.done() for t in tasks):
            values, _ = await asyncio.to_thread(_scrape, base_url)
            samples.append(values)
            await asyncio.sleep(0.05)
        for task in tasks:
            assert task.result().status_code == 200, task.result().text
    return samples


def test_protocol_gauges_under_load(server: RunningServer) -> None:
    deadline = time.monotonic() + 30
    while _scrape(server.base_url)[0]["largemodel_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    samples = asyncio.run(asyncio.wait_for(_load(server.base_url), 300))
    running = [s["largemodel_requests_running"] for s in samples]
    waiting = [s["largemodel_requests_waiting"] for s in samples]
    kv = [s["largemodel_kv_cache_usage_ratio"] for s in samples]
    # Running never exceeds the batch slots, and nothing more than the client sent is ever counted.
    assert max(running) <= SLOTS and all(r + w <= STREAMS for r, w in zip(running, waiting, strict=True))
    # With twice as many requests as slots, some sample sees the batch full and requests queued.
    assert any(r == SLOTS and w > 0 for r, w in zip(running, waiting, strict=True)), list(zip(running, waiting, strict=True))
    assert all(0.0 <= u <= 1.0 for u in kv) and max(kv) > 0
    # Running requests hold KV; none running, none held.
    assert all(u > 0 for r, u in zip(running, kv, strict=True) if r > 0)
    idle, types = _scrape(server.base_url)
    assert idle["largemodel_requests_running"] == 0 and idle["largemodel_requests_waiting"] == 0
    assert idle["largemodel_kv_cache_usage_ratio"] == 0
    for name in ("largemodel_requests_waiting", "largemodel_requests_running", "largemodel_kv_cache_usage_ratio"):
        assert types[name] == "gauge", (name, types.get(name))
    for name in ("largemodel_prefix_cache_queries_total", "largemodel_prefix_cache_hits_total"):
        assert types[name] == "counter", (name, types.get(name))
        assert idle[name] >= 0
    assert idle["largemodel_prefix_cache_hits_total"] <= idle["largemodel_prefix_cache_queries_total"]


def test_prefix_cache_counters_count_a_repeated_prompt(server: RunningServer) -> None:
    """The same long prompt twice: the second finds its full blocks cached (queries and hits are prompt
    tokens, hits a multiple of the 16-token block, the last prompt token always computed) and gives the
    same greedy text as the first."""
    prompt = " ".join(f"rule {i}: caches keep shared prompts." for i in range(3))  # within maxModelLen 128
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    before, _ = _scrape(server.base_url)
    first = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).json()
    assert "usage" in first, first
    middle, _ = _scrape(server.base_url)
    second = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).json()
    after, _ = _scrape(server.base_url)
    n = first["usage"]["prompt_tokens"]
    assert n > 32 and second["usage"]["prompt_tokens"] == n
    queries, hits = "largemodel_prefix_cache_queries_total", "largemodel_prefix_cache_hits_total"
    assert middle[queries] - before[queries] == n and middle[hits] - before[hits] == 0
    assert after[queries] - middle[queries] == n
    assert after[hits] - middle[hits] == (n - 1) // 16 * 16
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
