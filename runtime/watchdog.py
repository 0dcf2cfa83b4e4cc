"""Hung-collective detection: each rank watches its in-flight collective and its step clock.

A rank stuck in a collective (a peer SIGSTOPped, a wedged NCCL communicator, a peer pod frozen by
its node) is the failure the health checks miss: the process is alive, /healthz answers, and the
group serves nothing until the process group's own timeout, minutes later, if ever. Every blocking
collective goes through `ParallelContext`, which tells this watchdog what it waits on (op, tp|pp
group, peer ranks) and when it started; the rank's step clock is the time since the rank last made
progress (a collective finished) while a step is in flight. A rank waiting for the next request
(a worker blocked on the next micro-batch's header) is idle, not hung, and is not watched.

Past the timeout (spec.restart.collectiveTimeoutSeconds, env COLLECTIVE_TIMEOUT_SECONDS) the
watchdog logs one line naming the collective, group and peer:

    event=collective_hung rank=0 collective=all_reduce group=tp peer=1 waited_s=5.3 timeout_s=5 action=exit code=5

writes a marker into the pod's shared directory so the pod's /healthz fails liveness, and exits
the rank with EXIT_HUNG: the pod supervisor stops the pod's other ranks, the liveness link stops
the other stage pods, the container restarts, and the operator recreates the group within its
restart budget. The names both sides share are in largemodel.hangcontract.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from largemodel.hangcontract import COLLECTIVE_TIMEOUT_ENV, EXIT_HUNG

log = logging.getLogger(__name__)

__all__ = ["COLLECTIVE_TIMEOUT_ENV", "EXIT_HUNG", "Watchdog", "hung_reasons"]
HUNG_MARKER_PREFIX = "hung-rank"
MAX_POLL_S = 1.0


def hung_reasons(marker_dir: str | os.PathLike[str] | None) -> list[str]:
    """Reasons the watchdogs of this pod's ranks left (empty while no rank is hung)."""
    if not marker_dir:
        return []
    out = []
    for marker in sorted(Path(marker_dir).glob(HUNG_MARKER_PREFIX + "*")):
        try:
            out.append(marker.read_text().strip())
        except OSError:
            continue
    return out


def _exit_hung(_reason: str) -> None:
    logging.shutdown()
    os._exit(EXIT_HUNG)


class Watchdog:
    """Watches one rank. `begin`/`end` bracket a blocking collective; `step_begin`/`step_end` a step."""

    def __init__(self, rank: int, timeout_s: float, *, marker_dir: str | os.PathLike[str] | None = None,
                 on_hung: Callable[[str], None] | None = None, poll_s: float | None = None) -> None:
        self.rank = rank
        self.timeout_s = float(timeout_s)
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.on_hung = on_hung or _exit_hung
        self.poll_s = poll_s or min(MAX_POLL_S, max(0.05, self.timeout_s / 10))
        self.hung = ""
        self._current: tuple[str, str, str, float] | None = None
        self._last: tuple[str, str, str] | None = None
        self._step_since: float | None = None
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        """Start the watching thread (a daemon)."""
        self._thread = threading.Thread(target=self._run, name="collective-watchdog", daemon=True)
        self._thread.start()
        log.info("event=watchdog_start rank=%d timeout_s=%.0f", self.rank, self.timeout_s)
        return self

    def stop(self) -> None:
        """Stop watching (a clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def begin(self, op: str, group: str, peer: str) -> None:
        """A blocking collective starts: `op` on `group` waiting on `peer` (ranks, comma-separated)."""
        self._current = (op, group, peer, time.monotonic())

    def end(self) -> None:
        """The collective finished: progress."""
        current = self._current
        if current is not None:
            self._last = current[:3]
        self._current = None
        self._progress = time.monotonic()

    def step_begin(self) -> None:
        """Work arrived: from now on the rank must keep making progress."""
        now = time.monotonic()
        self._step_since, self._progress = now, now

    def step_end(self) -> None:
        """The rank is idle again (waiting for work is not a hang)."""
        self._step_since = None

    def check(self, now: float | None = None) -> str:
        """Why this rank is hung ("" while it is not)."""
        now = time.monotonic() if now is None else now
        current = self._current
        if current is not None:
            op, group, peer, since = current
            waited = now - since
            if waited > self.timeout_s:
                return f"collective={op} group={group} peer={peer} waited_s={waited:.1f} timeout_s={self.timeout_s:g}"
        if self._step_since is not None and current is None:
            idle = now - self._progress
            if idle > self.timeout_s:
                last = self._last or ("none", "-", "-")
                return (f"collective=none group=- peer=- step_stalled_s={idle:.1f} timeout_s={self.timeout_s:g} "
                        f"last_collective={last[0]} last_group={last[1]} last_peer={last[2]}")
        return ""

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            reason = self.check()
            if reason:
                self._fire(reason)
                return

    def _fire(self, reason: str) -> None:
        self.hung = reason
        log.error("event=collective_hung rank=%d %s action=exit code=%d", self.rank, reason, EXIT_HUNG)
        if self.marker_dir is not None:
            try:
                (self.marker_dir / f"{HUNG_MARKER_PREFIX}{self.rank}").write_text(f"rank {self.rank}: {reason}\n")
            except OSError as err:
                log.warning("event=watchdog_marker_failed error=%r", err)
        self.on_hung(reason)
