"""SIGTERM during streams: admission stops (503), every accepted stream finishes, everything exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.world import descendants, start_run, write_largemodel

STREAMS = 6  # more than maxBatchSize 4: two of them wait in the queue when SIGTERM arrives
NEW_TOKENS = 160


@pytest.fixture()
def drain_server(tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    lm_file = write_largemodel(tmp_path / "drain.yaml", "drain", tiny_model, max_batch=4, max_queue=8, max_len=256)
    running = start_run(lm_file, tmp_path / "run.log", "--grace", "60")
    try:
        yield running
    finally:
        running.stop(timeout_s=5)


async def _stream(client: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> dict[str, object]:
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": NEW_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if len(events) == 1:  # the role chunk is sent only once the request was admitted
                counter[0] += 1
                if counter[0] == STREAMS:
                    started.set()
    parsed = [json.loads(e) for e in events[:-1]]
    return {"done": events[-1] == "[DONE]", "usage": parsed[-1].get("usage"),
            "finish": [c["finish_reason"] for p in parsed for c in p.get("choices", []) if c["finish_reason"]]}


async def _scenario(base_url: str, proc_pid: int, send_term: object) -> tuple[list[dict[str, object]], list[int]]:
    started, counter = asyncio.Event(), [0]
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        streams = [asyncio.create_task(_stream(client, started, counter)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 60)
        send_term()  # type: ignore[operator]
        late_statuses: list[int] = []
        # New requests while draining: 503 (or refused once the listener is gone).
        for _ in range(100):
            try:
                resp = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 1})
                late_statuses.append(resp.status_code)
                if resp.status_code == 503:
                    assert resp.json()["error"]["type"] == "service_unavailable"
                    break
            except httpx.TransportError:
                break
            await asyncio.sleep(0.05)
        return list(await asyncio.wait_for(asyncio.gather(*streams), 120)), late_statuses


def test_sigterm_drains_streams_and_exits_zero(drain_server) -> None:  # type: ignore[no-untyped-def]
    ranks = descendants(drain_server.proc.pid)
    assert ranks, "largemodel run started no rank processes"
    results, late = asyncio.run(_scenario(
        drain_server.base_url, drain_server.proc.pid, lambda: drain_server.proc.send_signal(signal.SIGTERM)))
    for result in results:
        assert result["done"] and result["finish"] == ["length"], result
        assert result["usage"]["completion_tokens"] == NEW_TOKENS  # type: ignore[index]
    assert 503 in late, f"no request was refused while draining: {late}"
    assert drain_server.proc.wait(90) == 0, drain_server.log_text()[-4000:]
    log = drain_server.log_text()
    assert "server.draining" in log and "server.stopped drained=True" in log
    alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
    assert not alive, f"rank processes outlived largemodel run: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_ctrl_c_stops_every_rank(tiny_model: Path, tmp_path: Path) -> None:
    lm_file = write_largemodel(tmp_path / "ctrlc.yaml", "ctrlc", tiny_model)
    running = start_run(lm_file, tmp_path / "run.log")
    try:
        ranks = descendants(running.proc.pid)
        assert ranks
        running.proc.send_signal(signal.SIGINT)
        # `largemodel run` itself allows stage 0 grace + 30 s and the others 25 s before it kills them.
        try:
            code = running.proc.wait(100)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"largemodel run ignored Ctrl-C for 100 s:\n{running.log_text()[-6000:]}") from None
        assert code == 0, running.log_text()[-4000:]
        alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
        assert not alive, f"rank processes outlived Ctrl-C: {alive}"
    finally:
        running.stop(timeout_s=5)


def test_streams_past_the_grace_period_end_with_an_error_not_a_hang(tiny_model: Path, tmp_path: Path) -> None:
    lm_file = write_largemodel(tmp_path / "short.yaml", "short", tiny_model, max_batch=2, max_queue=4, max_len=1024)
    running = start_run(lm_file, tmp_path / "run.log", "--grace", "0.5")

    async def scenario() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            async def stream() -> list[str]:
                body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    return [line async for line in resp.aiter_lines() if line.startswith("data: ")]

            tasks = [asyncio.create_task(stream()) for _ in range(3)]
            await asyncio.sleep(1.0)
            running.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))

    try:
        for events in asyncio.run(scenario()):
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][len("data: "):])["error"]["code"] == "aborted"
        assert running.proc.wait(60) == 0, running.log_text()[-3000:]
        assert "server.drain_timeout" in running.log_text()
    finally:
        running.stop(timeout_s=5)


def test_a_killed_largemodel_run_takes_its_stages_with_it(tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives `largemodel run` no chance to stop its stage processes:
    each stage's supervisor sees its parent gone and stops its ranks itself."""
    lm_file = write_largemodel(tmp_path / "killed.yaml", "killed", tiny_model)
    running = start_run(lm_file, tmp_path / "run.log")
    try:
        ranks = descendants(running.proc.pid)
        assert ranks
        running.proc.kill()
        running.proc.wait(10)
        deadline = time.monotonic() + 60
        alive = ranks
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
        assert not alive, f"stage processes outlived a killed largemodel run: {alive}\n{running.log_text()[-3000:]}"
        assert "largemodel run (pid" in running.log_text()
    finally:
        running.stop(timeout_s=5)
