"""Hung collectives (issue 17): a rank stuck waiting on a frozen peer names it, fails liveness and exits.

The unit tests drive `Watchdog` by hand; the group tests run real `largemodel rank` pods on gloo,
SIGSTOP one rank mid-request, and check that the group stops by itself with the log line naming the
collective, the group and the peer, well inside a generous bound, with nothing left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from largemodel.runtime.watchdog import EXIT_HUNG, HUNG_MARKER_PREFIX, Watchdog, hung_reasons
from tests.support.pods import group_env, running_pods
from tests.support.tiny_models import word

TIMEOUT_S = 4  # COLLECTIVE_TIMEOUT_SECONDS of the group tests
HUNG_LINE = re.compile(r"event=collective_hung rank=(\d+) collective=(\w+) group=(\w+) peer=([\d,]+) waited_s=")


def test_a_collective_past_the_timeout_names_op_group_and_peer(tmp_path: Path) -> None:
    fired: list[str] = []
    dog = Watchdog(0, 5, marker_dir=tmp_path, on_hung=fired.append)
    dog.begin("all_reduce", "tp", "1")
    t0 = time.monotonic()
    assert dog.check(t0 + 4) == ""
    reason = dog.check(t0 + 6)
    assert reason.startswith("collective=all_reduce group=tp peer=1 waited_s=")
    dog._fire(reason)
    assert fired == [reason]
    assert hung_reasons(tmp_path) == [f"rank 0: {reason}"]
    assert (tmp_path / f"{HUNG_MARKER_PREFIX}0").exists()


def test_waiting_for_work_is_idle_and_a_stalled_step_is_not(tmp_path: Path) -> None:
    dog = Watchdog(3, 5, on_hung=lambda _: None)
    now = time.monotonic()
    assert dog.check(now + 3600) == ""  # nothing in flight, no step: idle forever is fine
    dog.begin("recv", "pp", "2")
    dog.end()
    dog.step_begin()  # a micro-batch arrived; no collective finishes for longer than the timeout
    reason = dog.check(time.monotonic() + 6)
    assert "step_stalled_s=" in reason and "last_collective=recv last_group=pp last_peer=2" in reason
    dog.step_end()
    assert dog.check(time.monotonic() + 3600) == ""


def test_the_thread_fires_once_and_a_finished_collective_never_does() -> None:
    fired: list[str] = []
    dog = Watchdog(1, 0.3, on_hung=fired.append, poll_s=0.02).start()
    try:
        for _ in range(20):  # quick collectives: never a hang
            dog.begin("broadcast", "tp", "0")
            time.sleep(0.01)
            dog.end()
        assert fired == []
        dog.begin("send", "pp", "0")
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fired) == 1 and fired[0].startswith("collective=send group=pp peer=0")
    finally:
        dog.stop()


def _stop_one_rank_mid_request(victim: int, http_url: str, prompt: str) -> float:
    """SIGSTOP `victim`, then send a request that needs it; returns when the request was sent."""
    os.kill(victim, signal.SIGSTOP)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0}

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server goes away with its group: that is the point
            httpx.post(f"{http_url}/v1/completions", json=body, timeout=60)

    threading.Thread(target=post, daemon=True).start()
    return time.monotonic()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sigstopped_rank_stops_the_group_with_the_hung_collective_logged(
        checkpoints: dict[str, Any], tmp_path: Path, tp: int, pp: int) -> None:
    """tp2: rank 1 frozen, rank 0 waits in a TP collective on it; pp2: stage 1 frozen, rank 0 waits on its answer."""
    model = checkpoints["models"]["gqa"]
    env = group_env(Path(model["dir"]), tp=tp, pp=pp, COLLECTIVE_TIMEOUT_SECONDS=str(TIMEOUT_S),
                    GROUP_SECRET="test-group-secret")
    with running_pods(env, tmp_path) as pods:
        victim = pods.rank_pids(0)[1] if tp == 2 else pods.rank_pids(1)[0]
        prompt = " ".join(map(word, checkpoints["prompts"][0]))
        sent = _stop_one_rank_mid_request(victim, pods.http_url, prompt)
        codes = pods.wait_exit(TIMEOUT_S + 60)
        stopped_after = time.monotonic() - sent
        logs = pods.tail()
        assert all(c not in (None, 0) for c in codes), f"exit codes {codes}\n{logs}"
        found = HUNG_LINE.findall(logs)
        assert found, f"no collective_hung line\n{logs}"
        rank, op, group, peer = found[0]
        assert (rank, peer) == ("0", "1"), found
        assert group == ("tp" if tp == 2 else "pp") and op in ("all_reduce", "all_gather", "broadcast", "recv", "send")
        assert f"code={EXIT_HUNG}" in logs
        assert stopped_after < TIMEOUT_S + 60, stopped_after  # generous: the bound is "nothing hangs"
        # Nothing is left behind: the frozen rank was killed with its pod.
        assert not Path(f"/proc/{victim}").exists() or "zombie" in Path(f"/proc/{victim}/status").read_text()
