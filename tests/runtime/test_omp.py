"""runtime/omp.py: a shard loaded with on_own_thread leaves no OpenMP team behind next to the engine thread's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from largemodel.runtime.omp import on_own_thread

# A fresh interpreter with 2 OpenMP threads: counts the process's OS threads after a parallel torch op
# run on a thread that ended (on_own_thread) and after the same op on the main thread.
PROBE = textwrap.dedent("""
    import json, os, time, torch
    from largemodel.runtime.omp import on_own_thread

    def threads(at_most=None):
        # an ended thread's OpenMP worker exits a moment after the join: wait for it, 10 s at most
        deadline = time.monotonic() + 10
        while at_most is not None and len(os.listdir("/proc/self/task")) > at_most and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(os.listdir("/proc/self/task"))

    def parallel_op():
        torch.ones(1 << 22).add_(1.0)  # far above torch's grain size: opens a 2-thread OpenMP region
        return torch.get_num_threads()

    before = threads()
    width = on_own_thread(parallel_op, "probe")
    after_own_thread = threads(at_most=before)
    parallel_op()
    print(json.dumps({"width": width, "before": before, "after_own_thread": after_own_thread,
                      "after_main": threads()}))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux only)")
def test_a_load_on_its_own_thread_takes_its_openmp_team_along() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["width"] == 2
    # The thread and its OpenMP worker are gone once it returns ...
    assert got["after_own_thread"] == got["before"], got
    # ... where the same op on the main thread keeps a worker for the life of the process.
    assert got["after_main"] > got["before"], got


def test_on_own_thread_returns_the_result_and_raises_the_error() -> None:
    assert on_own_thread(lambda: 41 + 1, "answer") == 42

    def fail() -> None:
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        on_own_thread(fail, "failing")
