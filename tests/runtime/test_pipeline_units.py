"""runtime/pipeline.py in one process: the micro-batch wire format and StageIO's books, on injected clocks.

No process group: StageIO talks to fake_stages.WiredContext (an in-memory wire) and reads a FakeClock.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
import torch
from prometheus_client import REGISTRY

from largemodel.runtime.pipeline import (
    HEADER_LEN,
    KIND_NOOP,
    KIND_SHUTDOWN,
    KIND_STEP,
    META_COLS,
    MicroBatch,
    PlanError,
    StageIO,
    payload_size,
)
from tests.support.fake_stages import FakeClock, TimedStage, Wire, WiredContext, small_config

ONE, POINT_SEVEN, POINT_NINE = 0x3FF0000000000000, 0x3FE6666666666666, 0x3FECCCCCCCCCCCCD  # IEEE-754 bits


def prefill_mb(**overrides: object) -> MicroBatch:
    """Two rows, one padded: a 3-token prefill in slot 3 and a 1-token decode in slot 0."""
    mb = MicroBatch(KIND_STEP, slots=[3, 0], start_pos=[0, 5], lengths=[3, 1], tokens=[[11, 12, 13], [14]],
                    top_k=[0, 40], seeds=[None, 0], temperature=[0.0, 0.7], top_p=[1.0, 0.9],
                    want_logits=True, first_of_step=False, last_of_step=True, step_age_us=1234)
    return replace(mb, **overrides)  # type: ignore[arg-type]


def bubble_gauge() -> float | None:
    return REGISTRY.get_sample_value("largemodel_pipeline_bubble_ratio")


# --- MicroBatch: the plan as two int64 tensors ----------------------------------------------------


def test_encode_writes_the_documented_layout() -> None:
    """Header: kind, rows, width, flags (logits 1 | first 2 | last 4), age, block-table width. Payload: META_COLS
    per row (slot, start, length, top_k, seed or -1, float bits of temperature and top_p, new sequence), then
    tokens padded to width, then the block tables (none here)."""
    header, payload = prefill_mb().encode()
    assert header.dtype == payload.dtype == torch.int64
    assert header.tolist() == [KIND_STEP, 2, 3, 1 | 4, 1234, 0]
    assert payload.tolist() == [3, 0, 3, 0, -1, 0, ONE, 0,
                                0, 5, 1, 40, 0, POINT_SEVEN, POINT_NINE, 0,
                                11, 12, 13,
                                14, 0, 0]
    assert payload_size(header) == payload.numel() == 2 * META_COLS + 2 * 3


def test_prefill_round_trip_keeps_every_field() -> None:
    mb = prefill_mb()
    back = MicroBatch.decode(*mb.encode())
    assert back == mb
    assert back.seeds == [None, 0]  # seed 0 is a seed, not "none"
    assert (back.width, back.phase) == (3, "prefill")


def test_decode_phase_round_trip_and_extreme_values() -> None:
    """One token per row is a decode; the largest seed, top_k and age, odd floats all come back bit for bit."""
    mb = MicroBatch(KIND_STEP, slots=[7, 1, 2], start_pos=[63, 0, 2**40], lengths=[1, 1, 1], tokens=[[0], [1], [2**31]],
                    top_k=[2**31 - 1, 1, 0], seeds=[2**63 - 1, None, 1], temperature=[5e-324, 1e300, 0.1],
                    top_p=[1e-9, 0.5, 1.0], step_age_us=2**62)
    header, payload = mb.encode()
    assert header.tolist() == [KIND_STEP, 3, 1, 2 | 4, 2**62, 0]
    back = MicroBatch.decode(header, payload)
    assert back == mb and (back.width, back.phase) == (1, "decode")
    assert payload_size(header) == payload.numel() == 3 * (META_COLS + 1)


@pytest.mark.parametrize("flags", range(8))
def test_every_flag_combination_round_trips(flags: int) -> None:
    mb = prefill_mb(want_logits=bool(flags & 1), first_of_step=bool(flags & 2), last_of_step=bool(flags & 4))
    header, payload = mb.encode()
    assert header.tolist()[3] == flags
    assert MicroBatch.decode(header, payload) == mb


@pytest.mark.parametrize("kind", [KIND_NOOP, KIND_SHUTDOWN])
def test_control_messages_have_no_payload(kind: int) -> None:
    mb = MicroBatch.control(kind)
    header, payload = mb.encode()
    assert header.tolist() == [kind, 0, 0, 2 | 4, 0, 0]
    assert payload.numel() == payload_size(header) == 0 and payload.dtype == torch.int64
    back = MicroBatch.decode(header, payload)
    assert back == mb and back.slots == [] and (back.width, back.phase) == (0, "decode")


def header(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("bad, why", [
    (header(KIND_STEP, 1, 1, 6), "shape (4,)"),
    (header(KIND_STEP, 1, 1, 6, 0, 0, 0), "shape (7,)"),
    (torch.zeros(1, HEADER_LEN, dtype=torch.int64), "shape (1, 6)"),
    (header(3, 1, 1, 6, 0, 0), "kind 3"),
    (header(-1, 1, 1, 6, 0, 0), "kind -1"),
    (header(KIND_STEP, 1, 1, 8, 0, 0), "flags 8"),
    (header(KIND_STEP, 1, 1, -1, 0, 0), "flags -1"),
    (header(KIND_STEP, 1, 1, 6, -5, 0), "step age -5"),
    (header(KIND_STEP, -1, 1, 6, 0, 0), "-1 rows"),
    (header(KIND_STEP, 1, -3, 6, 0, 0), "width -3"),
    (header(KIND_STEP, 2, 0, 6, 0, 0), "2 rows of width 0"),
    (header(KIND_STEP, 0, 4, 6, 0, 0), "0 rows of width 4"),
    (header(KIND_NOOP, 1, 1, 6, 0, 0), "kind 1 with 1 rows"),
])
def test_payload_size_rejects_a_header_encode_cannot_write(bad: torch.Tensor, why: str) -> None:
    with pytest.raises(PlanError, match=re.escape(why)):
        payload_size(bad)


def test_payload_size_bounds_rows_and_width() -> None:
    """A stage passes its batch and length limits, so a stray header cannot size a huge allocation."""
    assert payload_size(header(KIND_STEP, 8, 64, 6, 0, 0), max_rows=8, max_width=64) == 8 * (META_COLS + 64)
    with pytest.raises(PlanError, match="9 rows of width 1; this stage takes at most 8 rows of 64"):
        payload_size(header(KIND_STEP, 9, 1, 6, 0, 0), max_rows=8, max_width=64)
    with pytest.raises(PlanError, match="1 rows of width 65"):
        payload_size(header(KIND_STEP, 1, 65, 6, 0, 0), max_rows=8, max_width=64)
    with pytest.raises(PlanError, match="2 rows of width 1099511627776"):
        payload_size(header(KIND_STEP, 2, 2**40, 6, 0, 0), max_rows=8, max_width=64)


def test_block_tables_and_new_sequence_marks_round_trip() -> None:
    """Paged models: each row's block table follows the tokens, padded to the longest table; a row marked
    as a new sequence past position 0 (after a cached prefix) comes back marked."""
    mb = prefill_mb(start_pos=[32, 5], blocks=[[7, 2, 9], [4]], fresh=[True, False])
    head, payload = mb.encode()
    assert head.tolist() == [KIND_STEP, 2, 3, 1 | 4, 1234, 3]
    assert payload.tolist()[2 * META_COLS + 6:] == [7, 2, 9, 4, 0, 0]
    assert payload.tolist()[META_COLS - 1] == 1 and payload.tolist()[2 * META_COLS - 1] == 0
    back = MicroBatch.decode(head, payload)
    assert back.blocks == [[7, 2, 9], [4, 0, 0]] and back.fresh == [True, False]
    assert back.is_fresh(0) and not back.is_fresh(1)
    assert payload_size(head, max_rows=2, max_width=3, max_blocks=3) == payload.numel()
    with pytest.raises(PlanError, match="block tables of 3 blocks; this stage takes at most 2"):
        payload_size(head, max_rows=2, max_width=3, max_blocks=2)
    with pytest.raises(PlanError, match="-1 table blocks"):
        payload_size(header(KIND_STEP, 1, 1, 6, 0, -1))
    with pytest.raises(PlanError, match="0 rows of width 0 and 2 table blocks"):
        payload_size(header(KIND_NOOP, 0, 0, 6, 0, 2))


def test_decode_rejects_a_payload_that_does_not_match_its_header() -> None:
    head, payload = prefill_mb().encode()
    with pytest.raises(PlanError, match="payload has 21 values, its header says 22"):
        MicroBatch.decode(head, payload[:-1])
    with pytest.raises(PlanError, match="payload has 23 values, its header says 22"):
        MicroBatch.decode(head, torch.cat([payload, payload[:1]]))
    for length in (0, 4, -1):  # row 1's length column: must lie in 1..width (3)
        corrupt = payload.clone()
        corrupt[META_COLS + 2] = length
        with pytest.raises(PlanError, match=rf"row lengths \[{length}\] outside 1..3"):
            MicroBatch.decode(head, corrupt)


# --- StageIO: the bubble books ----------------------------------------------------------------------


def stage_io(pp_rank: int, clock: FakeClock, wire: Wire | None = None, pp: int = 2) -> tuple[StageIO, WiredContext]:
    ctx = WiredContext(pp=pp, pp_rank=pp_rank, wire=wire or Wire(), clock=clock)
    model = TimedStage(small_config(), first=pp_rank == 0, last=pp_rank == pp - 1, cost=0.0, clock=clock)
    return StageIO(ctx, model, clock), ctx


def test_stage_io_reads_perf_counter_unless_given_a_clock() -> None:
    ctx = WiredContext()
    assert StageIO(ctx, TimedStage(small_config(), first=True, last=True, cost=0, clock=FakeClock())).clock \
        is time.perf_counter


def test_books_of_one_step_set_the_gauge_to_idle_over_window() -> None:
    io, _ = stage_io(0, FakeClock())
    io.start_step(10.0)
    assert (io.step_origin, io.step_start, io.busy) == (10.0, 10.0, 0.0)
    io.account(11.0, 13.0)
    io.account(14.0, 15.0)
    assert (io.busy, io.last_end) == (3.0, 15.0)
    io.close_step(20.0)
    assert bubble_gauge() == 1 - 3 / 10


def test_window_opens_when_the_stage_is_free_and_a_new_step_clears_busy() -> None:
    io, _ = stage_io(1, FakeClock())
    io.start_step(0.0)
    io.account(2.0, 6.0)
    io.start_step(4.0)  # started for the pipeline at 4, but this stage worked until 6
    assert (io.step_origin, io.step_start, io.busy) == (4.0, 6.0, 0.0)
    io.account(6.0, 7.0)
    io.close_step(8.0)
    assert bubble_gauge() == 1 - 1 / 2
    io.start_step(9.0)  # later than last_end: the window opens at the step's start
    assert (io.step_origin, io.step_start) == (9.0, 9.0)


def test_close_step_clamps_and_ignores_an_empty_window() -> None:
    io, _ = stage_io(0, FakeClock())
    io.start_step(10.0)
    io.account(8.0, 12.0)  # compute that began before the window: busy 4 in a window of 2
    io.close_step(12.0)
    assert bubble_gauge() == 0.0
    io.start_step(20.0)
    io.account(21.0, 22.0)
    io.close_step(22.0)
    assert bubble_gauge() == 1 - 1 / 2
    io.start_step(30.0)
    io.close_step(30.0)  # no window: the gauge keeps the last step's value
    io.close_step(29.0)
    assert bubble_gauge() == 1 - 1 / 2


def test_send_next_stamps_the_age_on_its_clock_and_sends_to_the_next_stage() -> None:
    clock, wire = FakeClock(100.0), Wire()
    io, ctx = stage_io(0, clock, wire, pp=3)
    io.start_step(98.75)
    mb, hidden = prefill_mb(step_age_us=0), torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    io.send_next(mb, hidden)
    assert mb.step_age_us == 1_250_000 and io.pending_dst == 1 and len(io.pending_sends) == 3
    (s0, d0, head), (_, d1, payload), (_, d2, sent_hidden) = wire.sent
    assert (s0, d0, d1, d2) == (0, 1, 1, 1)
    assert head.tolist() == [KIND_STEP, 2, 3, 5, 1_250_000, 0] and payload.tolist() == mb.encode()[1].tolist()
    assert torch.equal(sent_hidden, hidden)
    clock.advance(0.5)
    io.send_next(MicroBatch.control(KIND_NOOP), None)  # waits for the step's three sends first
    assert ctx.waits == [("send", 1)] * 3 and len(io.pending_sends) == 1
    assert wire.sent[-1][2].tolist() == [KIND_NOOP, 0, 0, 6, 0, 0]  # control messages carry no age
    io.wait_sends()
    assert ctx.waits == [("send", 1)] * 4 and io.pending_sends == []


def test_share_plan_stamps_and_broadcasts_header_then_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(7.0)
    io, ctx = stage_io(0, clock)
    seen: list[list[int]] = []

    def broadcast_tp(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor.tolist())
        return tensor

    monkeypatch.setattr(ctx, "broadcast_tp", broadcast_tp)
    io.start_step(5.0)
    mb = prefill_mb()
    io.share_plan(mb)
    assert seen == [[KIND_STEP, 2, 3, 5, 2_000_000, 0], mb.encode()[1].tolist()]
    io.share_plan(MicroBatch.control(KIND_SHUTDOWN))
    assert seen[2:] == [[KIND_SHUTDOWN, 0, 0, 6, 0, 0]]  # nothing to broadcast after an empty header


def test_receive_anchors_the_step_at_arrival_minus_age() -> None:
    """Stage 1's clock is 1000 s ahead of stage 0's: only the 2.5 s age carries over."""
    wire, clock0, clock1 = Wire(), FakeClock(10.0), FakeClock(1003.0, offset=1000.0)
    sender, _ = stage_io(0, clock0, wire)
    receiver, _ = stage_io(1, clock1, wire)
    sender.start_step(7.5)
    first = prefill_mb(first_of_step=True, last_of_step=False)
    second = prefill_mb(first_of_step=False, slots=[4, 5])
    hidden = torch.full((2, 3, 4), 0.5)
    sender.send_next(first, hidden)  # age 2.5 s, sent at true 10
    clock0.advance(1.0)
    sender.send_next(second, hidden * 2)  # age 3.5 s, sent at true 11
    got, got_hidden = receiver.receive()
    assert clock1.now == 1010.0 and got == first and got.step_age_us == 2_500_000
    assert got_hidden is not None and torch.equal(got_hidden, hidden)
    assert (receiver.step_origin, receiver.step_start, receiver.busy) == (1007.5, 1007.5, 0.0)
    clock1.advance(2.0)
    receiver.account(1010.0, 1012.0)
    got, got_hidden = receiver.receive()  # not the step's first: the books stay open
    assert clock1.now == 1012.0 and got == second and got_hidden is not None and torch.equal(got_hidden, hidden * 2)
    assert (receiver.step_origin, receiver.step_start, receiver.busy) == (1007.5, 1007.5, 2.0)
    sender.send_next(MicroBatch.control(KIND_NOOP), None)
    got, got_hidden = receiver.receive()
    assert got == MicroBatch.control(KIND_NOOP) and got_hidden is None
    assert (receiver.step_origin, receiver.step_start, receiver.busy) == (1007.5, 1007.5, 2.0)


def test_receive_rejects_a_header_beyond_the_stage_limits_before_the_payload() -> None:
    wire = Wire()
    receiver, _ = stage_io(1, FakeClock(), wire)  # TimedStage: max_batch 8, max_len 64
    wire.put(0, 1, 0.0, header(KIND_STEP, 9, 2, 6, 0, 0))
    wire.put(0, 1, 0.0, torch.zeros(9 * (META_COLS + 2), dtype=torch.int64))
    with pytest.raises(PlanError, match="9 rows of width 2; this stage takes at most 8 rows of 64"):
        receiver.receive()
    assert wire.channel(0, 1).qsize() == 1  # the payload was never received into an allocation
