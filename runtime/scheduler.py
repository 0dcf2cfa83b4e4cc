"""Continuous batching on global rank 0: requests join and leave the running batch every step.

The engine blocks on collectives across every rank of the group, so it is driven from one
dedicated thread; the asyncio side (HTTP, gRPC) submits requests and reads their token chunks
through `RequestStream`s, and never touches the engine itself. Three parts, each testable alone:

- `BatchPlanner` schedules: which waiting sequences get a batch slot and a lane, and what each
  idle lane sends next (the prompt of a new sequence, the last token of a running one).
- `Postprocessor` consumes sampled tokens: detokenizes, applies EOS, stop strings and length
  limits, streams chunks and finishes requests.
- `Scheduler` owns the engine thread and the lock, and drives the engine through its one path,
  `submit(batch) -> ticket` then `result(ticket) -> tokens` (`BatchEngine`).

Running sequences are spread over up to `micro_batches` lanes; each lane has at most one batch
in the pipeline, so with pp > 1 the stages work on different lanes at the same time. A further
lane opens only as the engine would split a step (`micro_batch_count`): each lane must carry at
least `min_micro_batch_tokens`, since a small split batch re-reads the weights for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from largemodel import metrics
from largemodel.runtime import kvmetrics
from largemodel.runtime.detokenize import IncrementalDetokenizer, Tokenizer, find_stop, stop_prefix_holdback
from largemodel.runtime.engine import EngineError, SeqInput, Ticket, micro_batch_count
from largemodel.runtime.generation import (
    AdmissionError,
    Chunk,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    UnavailableError,
)

log = logging.getLogger(__name__)


class BatchEngine(Protocol):
    """What the scheduler drives: largemodel.runtime.engine.Engine (native and ENGINE=deepspeed).

    `submit` starts one batch (one micro-batch of the pipeline) and returns at once with a ticket;
    `result` waits for that batch's tokens, one per input in input order. Both raise EngineError
    for input the engine refuses before any rank did work (the group is fine).
    """

    max_batch_size: int
    max_model_len: int
    eos_token_ids: list[int]
    micro_batches: int
    min_micro_batch_tokens: int

    def validate(self, batch: list[SeqInput]) -> None: ...

    def submit(self, batch: list[SeqInput]) -> Ticket: ...

    def result(self, ticket: Ticket) -> list[int]: ...

    def start_sequence(self, slot: int, prompt: list[int]) -> int: ...

    def end_sequence(self, slot: int) -> None: ...

    def cached_prefix(self, prompt: list[int]) -> int: ...

    def kv_usage(self) -> tuple[int, int]: ...


@dataclass
class SeqState:
    """Scheduler-thread state of one admitted request."""

    request: GenerationRequest
    stream: RequestStream
    detok: IncrementalDetokenizer
    admitted_at: float
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    last_token_at: float = 0.0
    prefilled: bool = False


@dataclass
class Lane:
    """Sequences that travel the pipeline together: at most one batch of a lane is in flight.

    With M lanes, M batches are in the pipeline at once, so in decode every stage works on
    some lane while the others are on other stages.
    """

    seqs: list[SeqState] = field(default_factory=list)
    ticket: Ticket | None = None
    in_flight: list[SeqState] = field(default_factory=list)

    def launch(self, ticket: Ticket, seqs: list[SeqState]) -> None:
        """`seqs` went to the engine as one batch under `ticket`: their prompts are in the KV cache."""
        self.ticket, self.in_flight = ticket, seqs
        for seq in seqs:
            seq.prefilled = True

    def land(self) -> tuple[Ticket, list[SeqState]]:
        """Take the in-flight ticket and its sequences back: the lane is idle again."""
        assert self.ticket is not None, "land() on a lane with nothing in flight"
        ticket, seqs = self.ticket, self.in_flight
        self.ticket, self.in_flight = None, []
        return ticket, seqs


@dataclass
class LaneBatch:
    """One idle lane's next batch: its sequences and the engine input of each, in the same order."""

    lane: Lane
    seqs: list[SeqState]
    inputs: list[SeqInput]


class BatchPlanner:
    """Scheduling: the waiting queue, batch slots and lanes; admits sequences and builds batches.

    Not thread-safe: the Scheduler calls it under its lock. It never finishes a sequence itself;
    the ones it drops (cancelled) are returned for the caller to finish.
    """

    def __init__(self, max_batch_size: int, lanes: int, min_lane_tokens: int, max_prefill_tokens: int,
                 start_sequence: Callable[[int, list[int]], int] | None = None,
                 end_sequence: Callable[[int], None] | None = None,
                 cached_prefix: Callable[[list[int]], int] | None = None) -> None:
        """`start_sequence(slot, prompt)`: the engine's KV blocks for a new sequence, returning how many
        prompt tokens its prefix cache holds (the prefill starts there); `end_sequence(slot)` gives them back;
        `cached_prefix(prompt)` says how many it would find now, so admission charges only what is computed."""
        self.max_batch_size = max_batch_size
        self.start_sequence, self.end_sequence = start_sequence, end_sequence
        self.cached_prefix = cached_prefix
        self.min_lane_tokens = max(1, min_lane_tokens)
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: collections.deque[SeqState] = collections.deque()
        self.running: dict[int, SeqState] = {}
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.lanes = [Lane() for _ in range(max(1, lanes))]

    @property
    def queued(self) -> int:
        """Waiting requests beyond those the free slots take at the next step."""
        return len(self.waiting) - len(self.free_slots)

    def admit(self) -> list[SeqState]:
        """Move waiting sequences into free slots and the emptiest open lanes; return the cancelled ones dropped."""
        dropped: list[SeqState] = []
        prefill_tokens = 0
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if seq.stream.cancelled:
                dropped.append(self.waiting.popleft())
                continue
            prompt = seq.request.prompt_tokens
            cost = len(prompt) - (self.cached_prefix(list(prompt)) if self.cached_prefix is not None else 0)
            if prefill_tokens and prefill_tokens + cost > self.max_prefill_tokens:
                break  # bounds the prefill work one iteration adds, so running streams keep their pace
            self.waiting.popleft()
            prefill_tokens += cost
            seq.slot = self.free_slots.pop()
            self.running[seq.slot] = seq
            # Decode brings one token per sequence: lanes open as the engine would split that step.
            open_lanes = micro_batch_count(len(self.running), len(self.lanes), self.min_lane_tokens)
            min(self.lanes[:open_lanes], key=lambda lane: len(lane.seqs)).seqs.append(seq)
        return dropped

    def build_batch(self, lane: Lane) -> tuple[LaneBatch | None, list[SeqState]]:
        """The next batch of an idle lane (None when it is empty), and its cancelled sequences, dropped."""
        assert lane.ticket is None, "a lane has one batch in flight at most"
        dropped = [seq for seq in lane.seqs if seq.stream.cancelled]
        for seq in dropped:
            self.forget(seq)
        inputs = []
        for seq in lane.seqs:
            prompt = seq.request.prompt_tokens
            if not seq.prefilled:
                cached = self.start_sequence(seq.slot, list(prompt)) if self.start_sequence is not None else 0
                inputs.append(SeqInput(slot=seq.slot, tokens=list(prompt[cached:]), start_pos=cached,
                                       sampling=seq.request.sampling, new_sequence=True))
                continue
            tokens, pos = [seq.generated[-1]], len(prompt) + len(seq.generated) - 1
            inputs.append(SeqInput(slot=seq.slot, tokens=tokens, start_pos=pos, sampling=seq.request.sampling))
        return (LaneBatch(lane, list(lane.seqs), inputs) if inputs else None), dropped

    def plan(self) -> tuple[list[LaneBatch], list[SeqState]]:
        """Admit, then build a batch for every idle lane; also return every cancelled sequence dropped."""
        dropped = self.admit()
        batches = []
        for lane in self.lanes:
            if lane.ticket is None:
                batch, cancelled = self.build_batch(lane)
                dropped += cancelled
                if batch is not None:
                    batches.append(batch)
        return batches, dropped

    def forget(self, seq: SeqState) -> None:
        """Take a finished sequence out of its slot and lane."""
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.free_slots.append(seq.slot)
            if self.end_sequence is not None:
                self.end_sequence(seq.slot)
        for lane in self.lanes:
            if seq in lane.seqs:
                lane.seqs.remove(seq)


class Postprocessor:
    """Postprocessing: each sampled token becomes text; EOS, stop strings and lengths end a request.

    Pushes every chunk to the request's stream and records the request metrics; touches no
    scheduling state (the caller frees the slots of what `consume` reports finished).
    """

    def __init__(self, eos_token_ids: list[int], max_model_len: int) -> None:
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def consume(self, seqs: list[SeqState], tokens: list[int]) -> list[SeqState]:
        """Append one sampled token to each sequence and stream it; return the sequences that finished."""
        now = time.monotonic()
        metrics.GENERATION_TOKENS.inc(len(tokens))
        finished = []
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.generated:
                metrics.INTER_TOKEN.observe(now - seq.last_token_at)
            else:
                metrics.TTFT.observe(now - seq.admitted_at)
            seq.last_token_at = now
            seq.generated.append(token)
            reason = self._advance(seq, token)
            if reason is not None:
                finished.append(seq)
                self.finish(seq, reason, [token])
            else:
                request = seq.request
                end = len(seq.text) - stop_prefix_holdback(seq.text, request.stop)
                text = seq.text[seq.emitted:end]
                seq.emitted = max(seq.emitted, end)
                seq.stream.push(Chunk(text, [token], None, len(request.prompt_tokens), len(seq.generated)))
        return finished

    def _advance(self, seq: SeqState, token: int) -> FinishReason | None:
        """Add the text of `token` (just appended) to the sequence; the reason it ends here, if it does."""
        request = seq.request
        if (token in self.eos and not request.ignore_eos) or token in request.stop_token_ids:
            seq.text += seq.detok.flush()  # the stop token itself is not text
            return "stop"
        seq.text += seq.detok.add(token)
        # Text before `emitted` was searched on earlier steps; only a match reaching into the new text can be new.
        cut = find_stop(seq.text, request.stop, seq.emitted)
        if cut is not None:
            seq.text = seq.text[:cut]
            seq.emitted = min(seq.emitted, cut)
            return "stop"
        if (len(seq.generated) >= request.max_tokens
                or len(request.prompt_tokens) + len(seq.generated) >= self.max_model_len):
            seq.text += seq.detok.flush()
            return "length"
        return None

    def finish(self, seq: SeqState, reason: FinishReason, token_ids: list[int] | None = None) -> None:
        """Send the final chunk of a sequence and record its metrics."""
        text = seq.text[seq.emitted:]
        seq.emitted = len(seq.text)
        seq.stream.push(Chunk(text, token_ids or [], reason, len(seq.request.prompt_tokens), len(seq.generated)))
        status = {"stop": metrics.STATUS_OK, "length": metrics.STATUS_OK, "abort": metrics.STATUS_CANCELLED}
        metrics.REQUESTS.labels(status=status.get(reason, metrics.STATUS_ERROR)).inc()
        metrics.REQUEST_DURATION.observe(time.monotonic() - seq.admitted_at)


class Scheduler:
    """Admission on the event loop, the engine thread, and the lock between them."""

    def __init__(
        self,
        engine: BatchEngine,
        tokenizer: Tokenizer,
        max_queue: int,
        max_prefill_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = engine.max_batch_size
        self.max_model_len = engine.max_model_len
        self.max_queue = max_queue
        self._tokenizer = tokenizer
        # Bounds how much prefill work joins one step, so running streams keep a steady pace.
        self.planner = BatchPlanner(engine.max_batch_size, engine.micro_batches, engine.min_micro_batch_tokens,
                                    max_prefill_tokens or max(2048, engine.max_model_len),
                                    engine.start_sequence, engine.end_sequence, engine.cached_prefix)
        self.post = Postprocessor(engine.eos_token_ids, engine.max_model_len)
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)

    # ---- asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        metrics.QUEUE_CAPACITY.set(self.max_queue)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        """True while new requests are admitted (not draining, engine healthy)."""
        return not self._draining and self.failure is None and not self._stopping

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished (waiting or running)."""
        with self._cond:
            return len(self.planner.waiting) + len(self.planner.running)

    def check_lengths(self, prompt_len: int, max_tokens: int | None, prompt_param: str = "prompt") -> int:
        """Validate prompt and max_tokens against maxModelLen; return the max_tokens to use."""
        if prompt_len == 0:
            raise AdmissionError("the prompt is empty; send at least one token", prompt_param)
        if prompt_len >= self.max_model_len:
            raise AdmissionError(
                f"this model's maximum context length (maxModelLen) is {self.max_model_len} tokens and the "
                f"prompt has {prompt_len} tokens, which leaves no room to generate; shorten the prompt",
                prompt_param,
            )
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise AdmissionError(
                f"this model's maximum context length (maxModelLen) is {self.max_model_len} tokens; the prompt "
                f"has {prompt_len} tokens and max_tokens asks for {max_tokens}, so at most {room} can be "
                f"generated; lower max_tokens",
                "max_tokens",
            )
        return max_tokens

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Admit a request (call from the event loop); raise AdmissionError when it cannot be taken."""
        if self.failure is not None:
            raise UnavailableError(f"the engine failed and is not serving: {self.failure}")
        if self._draining or self._stopping:
            raise UnavailableError("the server is shutting down and admits no new requests")
        self.check_lengths(len(request.prompt_tokens), request.max_tokens)
        if request.max_tokens < 1:
            raise AdmissionError("max_tokens must be at least 1", "max_tokens")
        # Ask the engine whether it can run this request at all, so a bad one never joins a batch.
        try:
            self.engine.validate([SeqInput(slot=0, tokens=list(request.prompt_tokens), start_pos=0,
                                           sampling=request.sampling)])
        except EngineError as exc:
            raise AdmissionError(f"the engine cannot run this request: {exc}") from None
        stream = RequestStream(asyncio.get_running_loop(), len(request.prompt_tokens))
        seq = SeqState(request=request, stream=stream, admitted_at=time.monotonic(),
                       detok=IncrementalDetokenizer(self._tokenizer, request.prompt_tokens))
        with self._cond:
            if self.planner.queued >= self.max_queue:
                metrics.REQUESTS.labels(status=metrics.STATUS_REJECTED).inc()
                raise QueueFullError(
                    f"the server is at capacity ({self.max_batch_size} running, {len(self.planner.waiting)} "
                    f"waiting, maxQueue {self.max_queue}); retry later",
                    retry_after_s=1,
                )
            self.planner.waiting.append(seq)
            metrics.PROMPT_TOKENS.inc(len(request.prompt_tokens))
            metrics.REQUESTS_WAITING.set(len(self.planner.waiting))
            self._cond.notify()
        return stream

    def begin_drain(self) -> None:
        """Stop admitting; admitted requests run to completion."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight or `timeout_s` passes; True when idle."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abort whatever is still in flight and join the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        planner = self.planner
        log.info("scheduler.start max_batch_size=%d max_queue=%d max_model_len=%d lanes=%d",
                 self.max_batch_size, self.max_queue, self.max_model_len, len(planner.lanes))
        in_flight: collections.deque[Lane] = collections.deque()  # oldest first: results come in order
        try:
            while True:
                with self._cond:
                    while not (self._stopping or in_flight or planner.waiting or planner.running):
                        self._cond.wait()
                    if self._stopping and not in_flight:
                        break
                    batches, dropped = ([], []) if self._stopping else planner.plan()
                    for seq in dropped:  # counted before the gauges drop: "idle" never hides an uncounted request
                        self.post.finish(seq, "abort")
                    self._update_gauges()
                for batch in batches:
                    if self._launch(batch):
                        in_flight.append(batch.lane)
                if batches:
                    with self._cond:
                        self._update_gauges()  # the launched prefills now hold their KV blocks
                if in_flight:
                    ticket, seqs = in_flight.popleft().land()
                    finished = self.post.consume(seqs, self.engine.result(ticket))
                    if finished:
                        self._release(finished)
        except BaseException as exc:  # noqa: BLE001 - a broken engine must fail requests, not hang them
            log.exception("scheduler.engine_failed error=%r", exc)
            self.failure = exc
            if self.on_failure is not None:
                self.on_failure(exc)
        finally:
            reason = "error" if self.failure is not None else "abort"
            with self._cond:
                leftovers = list(planner.waiting) + list(planner.running.values())
                planner.waiting.clear()
                planner.running.clear()
                for seq in leftovers:
                    self.post.finish(seq, reason)
                self._update_gauges()
            log.info("scheduler.stop aborted=%d", len(leftovers))

    def _launch(self, batch: LaneBatch) -> bool:
        """Submit one lane's batch to the engine; False when the engine refused its input."""
        try:
            ticket = self.engine.submit(batch.inputs)
        except EngineError as exc:
            log.error("scheduler.batch_rejected requests=%d error=%s", len(batch.seqs), exc)
            for seq in batch.seqs:
                self.post.finish(seq, "error")
            self._release(batch.seqs)
            return False
        metrics.BATCH_SEQUENCES.observe(len(batch.inputs))
        batch.lane.launch(ticket, batch.seqs)
        return True

    def _release(self, seqs: list[SeqState]) -> None:
        """Free the slots and lanes of finished sequences."""
        with self._cond:
            for seq in seqs:
                self.planner.forget(seq)
            self._update_gauges()

    def _update_gauges(self) -> None:
        """Running, waiting and KV-cache gauges from the current state (lock held)."""
        running = self.planner.running.values()
        metrics.REQUESTS_WAITING.set(len(self.planner.waiting))
        metrics.REQUESTS_RUNNING.set(len(running))
        used_blocks, total_blocks = self.engine.kv_usage()
        if total_blocks:  # paged cache: the blocks running sequences hold (cached, unreferenced ones are free)
            kvmetrics.kv_usage(used_blocks, total_blocks)
        else:
            used = sum(len(s.request.prompt_tokens) + len(s.generated) for s in running)
            metrics.KV_CACHE_USAGE.set(used / (self.max_batch_size * self.max_model_len))
