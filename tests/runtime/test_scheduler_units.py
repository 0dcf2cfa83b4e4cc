"""The real Scheduler over a fake engine: pure Python, no process group, deterministic tokens.

FakeEngine implements the scheduler's engine protocol (submit -> ticket, result(ticket) -> tokens):
the next token of a sequence is its last input token + 1 (mod VOCAB), token 0 is EOS, and it
records every batch it was given. With a gate it holds every ticket until the test releases it,
as a pipeline with pp > 1 holds micro-batches in flight, so the tests decide what is in flight
when. FakeTokenizer decodes 1..26 to "a".."z" (0, EOS, to nothing).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from prometheus_client import REGISTRY

from largemodel.runtime.engine import EngineError, SamplingParams, SeqInput, Ticket
from largemodel.runtime.generation import (
    AdmissionError,
    Chunk,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    UnavailableError,
)
from largemodel.runtime.scheduler import BatchEngine, BatchPlanner, Postprocessor, Scheduler, SeqState

VOCAB = 27
EOS = 0
T = TypeVar("T")


class FakeTokenizer:
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str:
        return "".join(chr(ord("a") + t - 1) for t in token_ids if t != EOS)


def text_of(tokens: list[int]) -> str:
    return FakeTokenizer().decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class FakeEngine:
    """A BatchEngine in plain Python; `gated`: result() waits until the test releases a ticket."""

    def __init__(self, *, max_batch_size: int = 8, max_model_len: int = 64, micro_batches: int = 1,
                 min_micro_batch_tokens: int = 1, gated: bool = False) -> None:
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.eos_token_ids = [EOS]
        self.micro_batches, self.min_micro_batch_tokens = micro_batches, min_micro_batch_tokens
        self.batches: list[list[SeqInput]] = []
        self.max_pending = 0
        self.refuse_next = False  # the next submit raises EngineError, as for input no rank could run
        self.fail_results = False  # result() raises RuntimeError, as for a lost peer
        self._pending: dict[Ticket, list[int]] = {}
        self._gate = threading.Semaphore(0) if gated else None
        self._lock = threading.Lock()
        self.cached_prefix_tokens = 0  # what start_sequence says the prefix cache holds
        self.started: list[tuple[int, list[int]]] = []
        self.ended: list[int] = []

    def validate(self, batch: list[SeqInput]) -> None:
        slots = [s.slot for s in batch]
        if not batch or len(set(slots)) != len(slots) or not all(0 <= s < self.max_batch_size for s in slots):
            raise EngineError(f"bad slots {slots}")
        for seq in batch:
            if not seq.tokens or not all(0 <= t < VOCAB for t in seq.tokens):
                raise EngineError(f"slot {seq.slot}: token ids {seq.tokens} outside 0..{VOCAB - 1}")
            if seq.start_pos + len(seq.tokens) > self.max_model_len:
                raise EngineError(f"slot {seq.slot}: past max_model_len")

    def submit(self, batch: list[SeqInput]) -> Ticket:
        self.validate(batch)
        if self.refuse_next:
            self.refuse_next = False
            raise EngineError("refused")
        with self._lock:
            ticket = len(self.batches)
            self.batches.append(list(batch))
            self._pending[ticket] = [(s.tokens[-1] + 1) % VOCAB for s in batch]
            self.max_pending = max(self.max_pending, len(self._pending))
        return ticket

    def result(self, ticket: Ticket) -> list[int]:
        if self._gate is not None:
            self._gate.acquire()
        if self.fail_results:
            raise RuntimeError("peer lost")
        with self._lock:
            return self._pending.pop(ticket)

    def start_sequence(self, slot: int, prompt: list[int]) -> int:
        self.started.append((slot, list(prompt)))
        return min(self.cached_prefix_tokens, len(prompt) - 1)

    def end_sequence(self, slot: int) -> None:
        self.ended.append(slot)

    def cached_prefix(self, prompt: list[int]) -> int:
        return min(self.cached_prefix_tokens, len(prompt) - 1)

    def kv_usage(self) -> tuple[int, int]:
        return (len(self.started) - len(self.ended), 4 * self.max_batch_size)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def release(self, n: int = 1) -> None:
        """Let `n` more results through the gate."""
        assert self._gate is not None
        self._gate.release(n)

    def open_gate(self) -> None:
        if self._gate is not None:
            self._gate.release(10_000)


def request(prompt: list[int], max_tokens: int, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt_tokens=prompt, max_tokens=max_tokens, sampling=SamplingParams(), **kw)  # type: ignore[arg-type]


def with_scheduler(engine: FakeEngine, body: Callable[[Scheduler], Awaitable[T]], *, max_queue: int = 8) -> T:
    """Run `body` on an event loop with a Scheduler over `engine`; the body starts it when it wants."""
    async def main() -> T:
        scheduler = Scheduler(engine, FakeTokenizer(), max_queue)
        try:
            return await body(scheduler)
        finally:
            engine.open_gate()
            scheduler.stop(10)
    return asyncio.run(asyncio.wait_for(main(), 30))


async def collect(stream: RequestStream) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait for the engine thread to reach a state (no timing assertion: the outer wait_for bounds it)."""
    while not cond():
        await asyncio.sleep(0.005)
    assert cond(), what


def tokens_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_fake_engine_is_a_batch_engine() -> None:
    engine: BatchEngine = FakeEngine()  # mypy checks the protocol; this checks the rule the tests rely on
    ticket = engine.submit([SeqInput(0, [1, 2], 0), SeqInput(1, [26], 0)])
    assert engine.result(ticket) == [3, EOS]


# ---- batching ------------------------------------------------------------------------------------


def test_concurrent_requests_go_to_the_engine_in_one_batch() -> None:
    """N requests waiting together are one engine batch of width N per step: batched, not serialized."""
    engine = FakeEngine(max_batch_size=8)
    prompts = [[1 + i, 2 + i] for i in range(6)]
    before = counter("largemodel_batch_sequences_count"), counter("largemodel_batch_sequences_sum")

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        streams = [scheduler.submit(request(p, 5, ignore_eos=True)) for p in prompts]
        scheduler.start()
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = with_scheduler(engine, body)
    assert [len(b) for b in engine.batches] == [6] * 5  # 5 steps for 30 tokens, not 30 steps
    assert [s.start_pos for s in engine.batches[0]] == [0] * 6 and [s.tokens for s in engine.batches[0]] == prompts
    assert [s.start_pos for s in engine.batches[1]] == [2] * 6  # then one decode token each
    for prompt, chunks in zip(prompts, results, strict=True):
        want = [(prompt[-1] + k) % VOCAB for k in range(1, 6)]
        assert tokens_of(chunks) == want
        assert "".join(c.text for c in chunks) == text_of(want)
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    assert counter("largemodel_batch_sequences_count") - before[0] == 5
    assert counter("largemodel_batch_sequences_sum") - before[1] == 30


def test_a_cached_prefix_is_skipped_and_its_blocks_go_back_when_the_request_ends() -> None:
    """The engine's prefix cache holds the first 16 prompt tokens: the prefill sends only the rest, marked as
    a new sequence; the finished request's slot is handed back to the engine."""
    engine = FakeEngine(max_batch_size=2)
    engine.cached_prefix_tokens = 16
    prompt = [(3 + i) % VOCAB for i in range(20)]

    async def body(scheduler: Scheduler) -> list[Chunk]:
        stream = scheduler.submit(request(prompt, 3, ignore_eos=True))
        scheduler.start()
        return await collect(stream)

    chunks = with_scheduler(engine, body)
    first = engine.batches[0][0]
    assert engine.started == [(first.slot, prompt)]
    assert (first.start_pos, first.tokens, first.new_sequence) == (16, prompt[16:], True)
    second = engine.batches[1][0]
    assert (second.start_pos, second.new_sequence) == (20, False)
    assert tokens_of(chunks) == [(prompt[-1] + k) % VOCAB for k in range(1, 4)]
    assert engine.ended == [first.slot]


@pytest.mark.parametrize(("cached", "first_batch"), [(0, 1), (24, 4)])
def test_admission_charges_only_the_prompt_tokens_the_prefix_cache_does_not_hold(cached: int, first_batch: int) -> None:
    """A prefill budget of 40 tokens: four 30-token prompts are admitted one per step when nothing is
    cached, all four together when 24 tokens of each are (6 to compute each)."""
    engine = FakeEngine(max_batch_size=4)
    engine.cached_prefix_tokens = cached
    prompts = [[(1 + i + k) % VOCAB for k in range(30)] for i in range(4)]

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        streams = [scheduler.submit(request(p, 2, ignore_eos=True)) for p in prompts]
        scheduler.start()
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    async def run() -> list[list[Chunk]]:
        scheduler = Scheduler(engine, FakeTokenizer(), 8, max_prefill_tokens=40)
        try:
            return await body(scheduler)
        finally:
            scheduler.stop(10)

    asyncio.run(asyncio.wait_for(run(), 30))
    assert len(engine.batches[0]) == first_batch
    assert all(s.start_pos == cached and s.new_sequence for s in engine.batches[0])


def test_a_new_request_joins_the_running_batch_at_the_next_step() -> None:
    """Continuous batching: a request arriving mid-generation is prefilled in the same batch as the decodes."""
    engine = FakeEngine(gated=True)

    async def body(scheduler: Scheduler) -> tuple[list[Chunk], list[Chunk]]:
        first = scheduler.submit(request([1, 2, 3], 4, ignore_eos=True))
        scheduler.start()
        await until(lambda: len(engine.batches) == 1, "first prefill submitted")
        second = scheduler.submit(request([10], 2, ignore_eos=True))
        engine.open_gate()
        return await collect(first), await collect(second)

    first, second = with_scheduler(engine, body)
    step2 = engine.batches[1]
    assert [(s.slot, s.tokens, s.start_pos) for s in step2] == [(0, [4], 3), (1, [10], 0)]
    assert [len(b) for b in engine.batches] == [1, 2, 2, 1]
    assert tokens_of(first) == [4, 5, 6, 7] and tokens_of(second) == [11, 12]


def test_lanes_keep_several_batches_in_flight_with_pp() -> None:
    """micro_batches=2 (pp > 1): two lanes, each with one batch held by the engine at the same time."""
    engine = FakeEngine(micro_batches=2, min_micro_batch_tokens=1, gated=True)
    prompts = [[1], [5], [9], [13]]

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        streams = [scheduler.submit(request(p, 3, ignore_eos=True)) for p in prompts]
        scheduler.start()
        await until(lambda: engine.pending == 2, "both lanes in flight")
        assert len(engine.batches) == 2  # nothing more until a result comes back
        engine.open_gate()
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = with_scheduler(engine, body)
    assert engine.max_pending == 2
    assert [len(b) for b in engine.batches] == [2] * 6  # 3 steps x 2 lanes
    lanes = [sorted(s.slot for s in b) for b in engine.batches[:2]]
    assert sorted(lanes[0] + lanes[1]) == [0, 1, 2, 3]
    for batch in engine.batches[2:]:
        assert sorted(s.slot for s in batch) in lanes  # a sequence stays in its lane
    for prompt, chunks in zip(prompts, results, strict=True):
        assert tokens_of(chunks) == [prompt[0] + 1, prompt[0] + 2, prompt[0] + 3]


def test_a_lane_opens_only_with_min_micro_batch_tokens_in_each() -> None:
    """The engine's split rule decides the lanes: 4 decode tokens with a minimum of 4 stay one batch."""
    engine = FakeEngine(micro_batches=2, min_micro_batch_tokens=4, gated=True)

    async def body(scheduler: Scheduler) -> None:
        streams = [scheduler.submit(request([i + 1], 2, ignore_eos=True)) for i in range(4)]
        scheduler.start()
        engine.open_gate()
        await asyncio.gather(*(collect(s) for s in streams))

    with_scheduler(engine, body)
    assert [len(b) for b in engine.batches] == [4, 4] and engine.max_pending == 1


# ---- admission -----------------------------------------------------------------------------------


def test_a_full_queue_refuses_with_429() -> None:
    """Running slots plus maxQueue waiting; the next one is QueueFullError (HTTP 429, Retry-After)."""
    engine = FakeEngine(max_batch_size=1)
    rejected = counter("largemodel_requests_total", status="rejected")

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        streams = [scheduler.submit(request([1], 2)), scheduler.submit(request([2], 2))]
        with pytest.raises(QueueFullError) as info:
            scheduler.submit(request([3], 2))
        assert info.value.status == 429 and info.value.retry_after_s == 1 and "maxQueue 1" in str(info.value)
        assert scheduler.in_flight == 2
        scheduler.start()
        return [await collect(s) for s in streams]

    first, second = with_scheduler(engine, body, max_queue=1)
    assert tokens_of(first) == [2, 3] and tokens_of(second) == [3, 4]
    assert [len(b) for b in engine.batches] == [1, 1, 1, 1]  # one slot: one after the other
    assert counter("largemodel_requests_total", status="rejected") - rejected == 1


def test_lengths_are_checked_against_max_model_len() -> None:
    engine = FakeEngine(max_model_len=10)

    async def body(scheduler: Scheduler) -> list[Chunk]:
        assert scheduler.check_lengths(4, None) == 6  # no max_tokens: up to the context length
        assert scheduler.check_lengths(4, 6) == 6
        with pytest.raises(AdmissionError, match="empty") as empty:
            scheduler.check_lengths(0, 1)
        assert empty.value.param == "prompt"
        with pytest.raises(AdmissionError, match="leaves no room"):
            scheduler.check_lengths(10, None, "messages")
        with pytest.raises(AdmissionError, match="at most 6 can be generated") as over:
            scheduler.submit(request([1, 2, 3, 4], 7))
        assert over.value.param == "max_tokens"
        with pytest.raises(AdmissionError, match="at least 1"):
            scheduler.submit(request([1], 0))
        with pytest.raises(AdmissionError, match="engine cannot run this request"):
            scheduler.submit(request([1, VOCAB], 2))  # the engine's validate refuses the token id
        assert scheduler.in_flight == 0
        stream = scheduler.submit(request([1, 2, 3, 4], 6, ignore_eos=True))
        scheduler.start()
        return await collect(stream)

    chunks = with_scheduler(engine, body)
    assert tokens_of(chunks) == [5, 6, 7, 8, 9, 10]
    assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens + chunks[-1].completion_tokens == 10


def test_generation_stops_at_max_model_len_whatever_max_tokens_was() -> None:
    """A sequence whose context fills up ends with "length" (the scheduler's own limit, not the client's)."""
    engine = FakeEngine(max_model_len=6)

    async def body(scheduler: Scheduler) -> list[Chunk]:
        stream = scheduler.submit(request([1, 2], 4, ignore_eos=True))
        # A larger max_tokens than the room cannot be admitted; the room is 4, so 4 tokens end the context.
        scheduler.start()
        return await collect(stream)

    chunks = with_scheduler(engine, body)
    assert len(tokens_of(chunks)) == 4 and chunks[-1].finish_reason == "length"
    assert max(s.start_pos + len(s.tokens) for b in engine.batches for s in b) <= 6


# ---- postprocessing through the scheduler --------------------------------------------------------


def test_stop_string_cuts_the_text_and_is_never_streamed() -> None:
    """Prompt "a" generates "bcdef..."; stop "de" ends at "bc", and the "d" held back is never sent."""
    engine = FakeEngine()

    async def body(scheduler: Scheduler) -> list[Chunk]:
        stream = scheduler.submit(request([1], 20, stop=("de",)))
        scheduler.start()
        return await collect(stream)

    chunks = with_scheduler(engine, body)
    assert "".join(c.text for c in chunks) == "bc"
    assert [c.text for c in chunks] == ["b", "c", "", ""]  # "d" might start "de": held, then cut
    assert chunks[-1].finish_reason == "stop" and tokens_of(chunks) == [2, 3, 4, 5]
    assert len(engine.batches) == 4  # nothing generated past the stop


def test_stop_token_ids_and_eos_end_with_stop() -> None:
    engine = FakeEngine()

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        streams = [
            scheduler.submit(request([24], 10)),  # y -> z -> EOS
            scheduler.submit(request([24], 4, ignore_eos=True)),  # y z EOS a: length
            scheduler.submit(request([1], 10, stop_token_ids=(4,))),  # b c then "d" is a stop token
        ]
        scheduler.start()
        return [await collect(s) for s in streams]

    eos, ignored, stop_id = with_scheduler(engine, body)
    assert tokens_of(eos) == [25, 26, EOS] and "".join(c.text for c in eos) == "yz"
    assert eos[-1].finish_reason == "stop" and eos[-1].token_ids == [EOS] and eos[-1].completion_tokens == 3
    assert tokens_of(ignored) == [25, 26, EOS, 1] and "".join(c.text for c in ignored) == "yza"
    assert ignored[-1].finish_reason == "length"
    assert "".join(c.text for c in stop_id) == "bc" and stop_id[-1].finish_reason == "stop"


# ---- cancellation and failures -------------------------------------------------------------------


def test_cancelling_a_running_request_frees_its_slot_at_the_next_step() -> None:
    engine = FakeEngine(max_batch_size=1, gated=True)
    cancelled = counter("largemodel_requests_total", status="cancelled")

    async def body(scheduler: Scheduler) -> tuple[list[Chunk], list[Chunk]]:
        long = scheduler.submit(request([1], 50, ignore_eos=True))
        scheduler.start()
        engine.release(1)
        await until(lambda: len(engine.batches) == 2, "second step submitted")
        long.cancel()
        engine.release(1)
        chunks = await collect(long)
        assert len(engine.batches) == 2  # the cancelled sequence never went to the engine again
        nxt = scheduler.submit(request([7], 2, ignore_eos=True))  # the one slot is free again
        engine.open_gate()
        return chunks, await collect(nxt)

    chunks, nxt = with_scheduler(engine, body)
    assert chunks[-1].finish_reason == "abort" and tokens_of(chunks) == [2, 3]
    assert tokens_of(nxt) == [8, 9] and engine.batches[2][0].slot == 0 and engine.batches[2][0].start_pos == 0
    assert counter("largemodel_requests_total", status="cancelled") - cancelled == 1


def test_cancelling_a_waiting_request_never_runs_it() -> None:
    engine = FakeEngine(max_batch_size=1)

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        first, waiting = scheduler.submit(request([1], 2)), scheduler.submit(request([9], 2))
        waiting.cancel()
        scheduler.start()
        return [await collect(first), await collect(waiting)]

    first, waiting = with_scheduler(engine, body)
    assert tokens_of(first) == [2, 3]
    assert [(c.finish_reason, c.completion_tokens) for c in waiting] == [("abort", 0)]
    assert all(s.tokens != [9] for b in engine.batches for s in b)


def test_a_batch_the_engine_refuses_fails_its_requests_only() -> None:
    """EngineError at submit: the group did no work, so those requests end with "error" and serving goes on."""
    engine = FakeEngine()
    engine.refuse_next = True

    async def body(scheduler: Scheduler) -> tuple[list[Chunk], list[Chunk]]:
        refused = scheduler.submit(request([1], 3))
        scheduler.start()
        chunks = await collect(refused)
        return chunks, await collect(scheduler.submit(request([1], 3)))

    refused, served = with_scheduler(engine, body)
    assert [c.finish_reason for c in refused] == ["error"]
    assert tokens_of(served) == [2, 3, 4]


def test_an_engine_failure_fails_every_request_and_stops_admission() -> None:
    engine = FakeEngine()
    engine.fail_results = True
    failures: list[BaseException] = []

    async def body(scheduler: Scheduler) -> list[list[Chunk]]:
        scheduler.on_failure = failures.append
        streams = [scheduler.submit(request([1], 3)), scheduler.submit(request([2], 3))]
        scheduler.start()
        results = [await collect(s) for s in streams]
        assert not scheduler.accepting
        with pytest.raises(UnavailableError, match="peer lost"):
            scheduler.submit(request([1], 3))
        return results

    results = with_scheduler(engine, body)
    assert [[c.finish_reason for c in r] for r in results] == [["error"], ["error"]]
    assert [str(f) for f in failures] == ["peer lost"]


def test_draining_refuses_new_requests_and_finishes_admitted_ones() -> None:
    engine = FakeEngine()

    async def body(scheduler: Scheduler) -> list[Chunk]:
        stream = scheduler.submit(request([1], 3))
        scheduler.begin_drain()
        with pytest.raises(UnavailableError, match="shutting down"):
            scheduler.submit(request([1], 3))
        scheduler.start()
        chunks = await collect(stream)
        assert await scheduler.wait_idle(5)
        return chunks

    assert tokens_of(with_scheduler(engine, body)) == [2, 3, 4]


# ---- the two halves on their own -----------------------------------------------------------------


def _seq(prompt: list[int], max_tokens: int, **kw: object) -> SeqState:
    from largemodel.runtime.detokenize import IncrementalDetokenizer

    req = request(prompt, max_tokens, **kw)
    return SeqState(req, RequestStream(asyncio.get_running_loop(), len(prompt)),
                    IncrementalDetokenizer(FakeTokenizer(), prompt), admitted_at=0.0)


def test_planner_admits_into_slots_and_bounds_prefill_per_step() -> None:
    async def main() -> None:
        planner = BatchPlanner(max_batch_size=4, lanes=1, min_lane_tokens=1, max_prefill_tokens=5)
        seqs = [_seq([1, 2, 3], 2), _seq([4, 5, 6], 2), _seq([7], 2)]
        planner.waiting.extend(seqs)
        batches, dropped = planner.plan()
        assert dropped == [] and len(batches) == 1
        # 3 + 3 prompt tokens exceed the prefill budget of 5: the second waits for the next step.
        assert [(i.slot, i.tokens, i.start_pos) for i in batches[0].inputs] == [(0, [1, 2, 3], 0)]
        batches[0].lane.launch(0, batches[0].seqs)
        seqs[0].generated.append(4)
        assert planner.plan() == ([], [])  # the lane is in flight: nothing new for it
        batches[0].lane.land()
        batches, _ = planner.plan()
        assert [(i.slot, i.tokens, i.start_pos) for i in batches[0].inputs] == [
            (0, [4], 3), (1, [4, 5, 6], 0), (2, [7], 0)]
        seqs[1].stream.cancel()
        batches[0].lane.launch(1, batches[0].seqs)
        batches[0].lane.land()
        seqs[2].generated.append(8)
        seqs[0].generated.append(5)
        batches, dropped = planner.plan()
        assert dropped == [seqs[1]] and sorted(planner.free_slots) == [1, 3]
        assert [i.slot for i in batches[0].inputs] == [0, 2]

    asyncio.run(main())


def test_postprocessor_holds_back_a_possible_stop_and_finishes() -> None:
    async def main() -> list[Chunk]:
        post = Postprocessor([EOS], max_model_len=64)
        seq = _seq([1], 10, stop=("cx",))
        assert post.consume([seq], [2]) == []  # "b"
        assert post.consume([seq], [3]) == []  # "c" could start "cx": held back
        assert post.consume([seq], [4]) == []  # "cd" is no stop: "c" and "d" go out
        assert post.consume([seq], [EOS]) == [seq]
        return await collect(seq.stream)

    chunks = asyncio.run(main())
    assert [c.text for c in chunks] == ["b", "", "cd", ""]
    assert [c.finish_reason for c in chunks] == [None, None, None, "stop"]

