"""Keep one OpenMP thread team per process, so torch's parallel ops hand off at full speed.

libgomp gives every thread that opens a parallel region its own team of worker threads, kept until
that thread exits, and counts all of them together. Once a process holds more OpenMP threads than it
has CPUs, every barrier spins about 100 iterations instead of ~300,000 before sleeping in a futex
(`gomp_throttled_spin_count_var`, libgomp's wait.h), so each parallel op pays a sleep and a wake-up.

Rank 0 serves from its engine thread (runtime/scheduler.py), not the thread that loaded the shard. A
shard loaded on the main thread left the main thread's team alive next to the engine thread's: two
teams of OMP_NUM_THREADS on a host with that many CPUs, and the served decode measured 1.7x slower per
matmul than the same loop on one thread (docs/PERFORMANCE.md). Loading on a thread that ends takes its
team with it, so the engine thread's team is the only one while serving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[[], T], name: str) -> T:
    """fn() on a new thread that exits when it returns (taking its OpenMP team along); its result or exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread below
            error.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
