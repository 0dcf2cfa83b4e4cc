"""The pipeline bubble gauge counts fill and drain.

Exact: the real Engine (rank 0) and worker_loop (rank 1, on a thread) run a pp=2 world in this
process over fake_stages' wire, each rank on its own injected clock (rank 1's reads 1000 s ahead),
stages that take a fixed number of seconds: every value the gauge takes is a number written down
here. End to end: a real pp=2 world of processes, where only what holds whatever the timing is
asserted (one value per step, in (0, 1), the registry shows the last).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from largemodel import metrics
from largemodel.runtime.engine import Engine, SeqInput, worker_loop
from tests.support.fake_stages import FakeClock, TimedStage, Wire, WiredContext, small_config
from tests.support.rank_world import logs, run_world
from tests.support.tiny_models import TinyModel, build_checkpoint


class GaugeRecorder:
    """Stands in for the bubble gauge: every value set, with the thread (rank) that set it."""

    def __init__(self) -> None:
        self.values: list[tuple[str, float]] = []

    def set(self, value: float) -> None:
        self.values.append((threading.current_thread().name, value))

    def of(self, name: str) -> list[float]:
        return [v for n, v in self.values if n == name]


def run_pp2(monkeypatch: pytest.MonkeyPatch, costs: tuple[float, float], micro_batches: int,
            drive: Callable[[Engine], Any]) -> tuple[list[float], list[float], Any]:
    """Rank 0 drives an Engine with `drive`, rank 1 runs worker_loop; returns (rank 0's, rank 1's gauge values,
    drive's result). Rank 0's clock starts at 100 (true 100), rank 1's at 1000 (true 0, 1000 ahead)."""
    recorder, me = GaugeRecorder(), threading.current_thread().name
    monkeypatch.setattr(metrics, "PIPELINE_BUBBLE", recorder)
    wire, config = Wire(), small_config()
    clock0, clock1 = FakeClock(100.0), FakeClock(1000.0, offset=1000.0)
    ctx0 = WiredContext(pp=2, pp_rank=0, wire=wire, clock=clock0)
    ctx1 = WiredContext(pp=2, pp_rank=1, wire=wire, clock=clock1)
    stage0 = TimedStage(config, first=True, last=False, cost=costs[0], clock=clock0)
    stage1 = TimedStage(config, first=False, last=True, cost=costs[1], clock=clock1)
    failures: list[BaseException] = []

    def rank1() -> None:
        try:
            worker_loop(stage1, ctx1, clock1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    worker = threading.Thread(target=rank1, name="rank1", daemon=True)
    worker.start()
    engine = Engine(stage0, ctx0, micro_batches=micro_batches, min_micro_batch_tokens=1, heartbeat_s=3600.0,
                    clock=clock0)
    try:
        out = drive(engine)
    finally:
        engine.shutdown()
        worker.join(timeout=10)
    assert not worker.is_alive() and not failures, f"rank 1 did not finish cleanly: {failures}"
    return recorder.of(me), recorder.of("rank1"), out


def prefill(count: int) -> list[SeqInput]:
    return [SeqInput(slot, [10 + slot, 20 + slot], 0) for slot in range(count)]


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_equal_stages_bubble_is_fill_plus_drain(monkeypatch: pytest.MonkeyPatch, micro_batches: int) -> None:
    """Two 1 s stages, M micro-batches: each stage is busy M of M + 1 seconds, on both ranks, every step.

    M = 1: stage 0 computes 100..101 and waits for stage 1 (true 101..102): 1 - 1/2. Rank 1's window
    opens at its arrival (1101) minus the 1 s age the header carries: also 1 - 1/2. M = 4: 1 - 4/5,
    the textbook (pp - 1) / (M + pp - 1).
    """
    m = micro_batches
    rank0, rank1, tokens = run_pp2(monkeypatch, (1.0, 1.0), m, lambda e: [e.step(prefill(4)) for _ in range(3)])
    assert rank0 == [1 - m / (m + 1)] * 3
    assert rank1 == [1 - m / (m + 1)] * 3
    assert tokens == [[21, 22, 23, 24]] * 3  # last token + 1: plan, hidden states and answers stayed together


def test_slower_last_stage_and_busy_stage_not_counted_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 0 takes 2 s, stage 1 3 s per micro-batch; two steps of 2 micro-batches, then two one-micro-batch
    submits back to back.

    step (both times): rank 0 computes 2 + 2 s and closes when stage 1's last answer is back, 8 s after
    the start: 1 - 4/8. Rank 1 gets micro-batch 0 at +2 s (age 2 s), then works 3 + 3 s: 1 - 6/8.
    submit A, B: rank 0's window closes when its own compute ends (1 - 2/2, twice). On rank 1, A opens
    when rank 0 started it (1116) and waits 2 s for it: 1 - 3/5. B's header (age 2 s) is taken at 1121,
    when rank 1 is done with A: by its age B's window would open at 1119, but a stage busy with an
    earlier step is not idle for this one, so it opens at 1121: 1 - 3/3 (from 1119: 1 - 3/5).
    """
    def drive(engine: Engine) -> list[Any]:
        steps = [engine.step(prefill(2)) for _ in range(2)]
        a = engine.submit([SeqInput(0, [30], 2)])
        b = engine.submit([SeqInput(1, [40], 2)])
        return [*steps, engine.result(a), engine.result(b)]

    rank0, rank1, tokens = run_pp2(monkeypatch, (2.0, 3.0), 2, drive)
    assert rank0 == [1 - 4 / 8, 1 - 4 / 8, 1 - 2 / 2, 1 - 2 / 2]
    assert rank1 == [1 - 6 / 8, 1 - 6 / 8, 1 - 3 / 5, 1 - 3 / 3]
    assert tokens == [[21, 22], [21, 22], [31], [41]]


def test_one_stage_has_no_bubble(monkeypatch: pytest.MonkeyPatch) -> None:
    """pp = 1: the step's window is exactly the stage's compute, 2 micro-batches of 1.5 s: 1 - 3/3."""
    recorder = GaugeRecorder()
    monkeypatch.setattr(metrics, "PIPELINE_BUBBLE", recorder)
    clock = FakeClock(5.0)
    stage = TimedStage(small_config(), first=True, last=True, cost=1.5, clock=clock)
    engine = Engine(stage, WiredContext(clock=clock), micro_batches=2, min_micro_batch_tokens=1, clock=clock)
    assert engine.step(prefill(2)) == [21, 22]
    assert [v for _, v in recorder.values] == [0.0] and clock.now == 8.0


STEPS = 12
# Wider than the correctness variants, so a stage's compute outweighs Python and gloo overheads.
WIDE = TinyModel("wide", "llama", dict(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False))


@pytest.mark.timeout(60)
def test_bubble_ratio_counts_pipeline_fill_and_drain(tmp_path: Path) -> None:
    """pp=2 processes, prefill steps of 4 sequences, 1 then 4 micro-batches, on the real clock.

    Only what holds whatever the timing: one value per step on each rank; never 1 (a stage computes in
    its window); never 0: stage 1's window opens when stage 0 started the step, at least stage 0's
    first compute before stage 1 can start (fill), and stage 0's closes once stage 1's answer is back,
    after stage 1 computed the last micro-batch (drain); the registry shows the last step's value.
    """
    model_dir = build_checkpoint(WIDE, tmp_path / "wide")
    spec = {"dir": str(model_dir), "prompt": [(7 * i) % 250 + 3 for i in range(48)],
            "steps": STEPS, "out": str(tmp_path / "out")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    codes = run_world(1, 2, "bubble_main.py", [str(tmp_path / "spec.json")], timeout_s=50, log_dir=tmp_path)
    assert codes == [0, 0], f"exit codes {codes}\n{logs(tmp_path)}"
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for rank, values in enumerate(ranks):
        for count in ("1", "4"):
            ratios = values[count]
            assert len(ratios) == STEPS, f"rank {rank}, {count} micro-batches: one value per step, got {ratios}"
            assert all(0.0 < r < 1.0 for r in ratios), f"rank {rank}, {count} micro-batches: {ratios}"
            assert values[f"exposed{count}"] == [ratios[-1]], f"rank {rank}: the registry shows the last step's"
