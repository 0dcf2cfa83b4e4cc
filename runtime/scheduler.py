"""Continuous batching on global rank 0: requests join and leave the running batch every step.

The engine blocks on collectives across every rank of the group, so it is driven from one
dedicated thread; the asyncio side (HTTP, gRPC) submits requests and reads their token chunks
through `RequestStream`s, and never touches the engine itself. Running sequences are spread
over up to `micro_batches` lanes; each lane has at most one batch in the pipeline, so with
pp > 1 the stages work on different lanes at the same time (engine submit/result). As the
engine does for one step, a further lane opens only when each would carry at least the
engine's `min_micro_batch_tokens`: a small split batch re-reads the weights for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from largemodel import metrics
from largemodel.runtime.detokenize import IncrementalDetokenizer, find_stop, stop_prefix_holdback
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

class EngineLike(Protocol):
    """The part of largemodel.runtime.engine.Engine the scheduler uses."""

    max_batch_size: int
    max_model_len: int
    eos_token_ids: list[int]

    micro_batches: int

    def step(self, batch: list[Any]) -> list[int]: ...


@dataclass
class _Sequence:
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
class _Lane:
    """Sequences that travel the pipeline together: at most one batch of a lane is in flight.

    With M lanes, M batches are in the pipeline at once, so in decode every stage works on
    some lane while the others are on other stages (the engine's submit/result).
    """

    seqs: list[_Sequence] = field(default_factory=list)
    ticket: Any = None
    in_flight: list[_Sequence] = field(default_factory=list)


class Scheduler:
    """Bounded waiting queue + batch slots + the engine thread."""

    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Any,
        max_queue: int,
        seq_input: Callable[..., Any],
        max_prefill_tokens: int | None = None,
        input_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self.engine = engine
        self.max_batch_size = engine.max_batch_size
        self.max_model_len = engine.max_model_len
        self.max_queue = max_queue
        self._tokenizer = tokenizer
        self._seq_input = seq_input
        # Errors the engine raises for invalid input before any rank did work: the group is fine.
        self._input_errors = input_errors
        # Bounds how much prefill work joins one step, so running streams keep a steady pace.
        self._max_prefill_tokens = max_prefill_tokens or max(2048, engine.max_model_len)
        self._eos = frozenset(engine.eos_token_ids)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: dict[int, _Sequence] = {}
        self._free_slots = list(range(self.max_batch_size - 1, -1, -1))
        self._stopping = False
        self._draining = False
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        # An engine with submit/result (largemodel's does) keeps one batch per lane in flight, so
        # pipeline stages overlap across decode steps; otherwise one step() at a time.
        self._submit_batch: Callable[[list[Any]], Any] | None = getattr(engine, "submit", None)
        self._batch_result: Callable[[Any], tuple[list[int], Any]] | None = getattr(engine, "result", None)
        if self._submit_batch is None or self._batch_result is None:
            self._submit_batch = self._batch_result = None
        self._pipelined = self._submit_batch is not None
        self._lanes = [_Lane() for _ in range(max(1, engine.micro_batches) if self._pipelined else 1)]
        # The engine's rule for splitting a step: a micro-batch re-reads every weight of its stage,
        # so a lane is only worth it with this many tokens per step in it (decode: one per sequence).
        self._min_lane_tokens = max(1, int(getattr(engine, "min_micro_batch_tokens", 1)))
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
            return len(self._waiting) + len(self._running)

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
        self._check_input(request)
        stream = RequestStream(asyncio.get_running_loop(), len(request.prompt_tokens))
        seq = _Sequence(
            request=request,
            stream=stream,
            detok=IncrementalDetokenizer(self._tokenizer, request.prompt_tokens),
            admitted_at=time.monotonic(),
        )
        with self._cond:
            # Waiting requests that a free slot will take at the next step do not count as queued.
            if len(self._waiting) - len(self._free_slots) >= self.max_queue:
                metrics.REQUESTS.labels(status=metrics.STATUS_REJECTED).inc()
                raise QueueFullError(
                    f"the server is at capacity ({self.max_batch_size} running, {len(self._waiting)} waiting, "
                    f"maxQueue {self.max_queue}); retry later",
                    retry_after_s=1,
                )
            self._waiting.append(seq)
            metrics.PROMPT_TOKENS.inc(len(request.prompt_tokens))
            metrics.REQUESTS_WAITING.set(len(self._waiting))
            self._cond.notify()
        return stream

    def _check_input(self, request: GenerationRequest) -> None:
        """Ask the engine whether it can run this request at all, so a bad one never joins a batch."""
        validate = getattr(self.engine, "validate", None)
        if validate is None:
            return
        probe = self._seq_input(slot=0, tokens=list(request.prompt_tokens), start_pos=0, sampling=request.sampling)
        try:
            validate([probe])
        except self._input_errors as exc:
            raise AdmissionError(f"the engine cannot run this request: {exc}") from None

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
        log.info("scheduler.start max_batch_size=%d max_queue=%d max_model_len=%d lanes=%d pipelined=%s",
                 self.max_batch_size, self.max_queue, self.max_model_len, len(self._lanes), self._pipelined)
        in_flight: collections.deque[_Lane] = collections.deque()  # oldest first: results come in order
        try:
            while True:
                with self._cond:
                    while not (self._stopping or in_flight or self._waiting or self._running):
                        self._cond.wait()
                    if self._stopping and not in_flight:
                        break
                    if not self._stopping:
                        self._admit()
                    plans = [] if self._stopping else [
                        (lane, self._build_batch(lane)) for lane in self._lanes if lane.ticket is None
                    ]
                for lane, batch in plans:
                    if batch and self._launch(lane, batch):
                        in_flight.append(lane)
                if in_flight:
                    lane = in_flight.popleft()
                    tokens = self._batch_result(lane.ticket)[0] if self._batch_result else lane.ticket
                    seqs, lane.ticket, lane.in_flight = lane.in_flight, None, []
                    self._consume(seqs, tokens)
        except BaseException as exc:  # noqa: BLE001 - a broken engine must fail requests, not hang them
            log.exception("scheduler.engine_failed error=%r", exc)
            self.failure = exc
            if self.on_failure is not None:
                self.on_failure(exc)
        finally:
            with self._cond:
                leftovers = list(self._waiting) + list(self._running.values())
                self._waiting.clear()
                self._running.clear()
                self._update_gauges()
            reason = "error" if self.failure is not None else "abort"
            for seq in leftovers:
                self._finish(seq, reason)
            log.info("scheduler.stop aborted=%d", len(leftovers))

    def _launch(self, lane: _Lane, batch: list[tuple[_Sequence, Any]]) -> bool:
        """Start one lane's batch through the pipeline; False when the engine refused its input."""
        seqs = [seq for seq, _ in batch]
        inputs = [inp for _, inp in batch]
        try:
            # Without submit/result the engine runs the batch now and the "ticket" is its tokens.
            lane.ticket = self._submit_batch(inputs) if self._submit_batch else self.engine.step(inputs)
        except self._input_errors as exc:
            log.error("scheduler.batch_rejected requests=%d error=%s", len(seqs), exc)
            self._release(seqs, "error")
            return False
        lane.in_flight = seqs
        for seq in seqs:
            seq.prefilled = True
        return True

    def _admit(self) -> None:
        """Move waiting requests into free slots and the emptiest lanes (lock held)."""
        prefill_tokens = 0
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if seq.stream.cancelled:
                self._waiting.popleft()
                self._finish(seq, "abort")
                continue
            cost = len(seq.request.prompt_tokens)
            if prefill_tokens and prefill_tokens + cost > self._max_prefill_tokens:
                break  # bounds the prefill work one iteration adds, so running streams keep their pace
            self._waiting.popleft()
            prefill_tokens += cost
            seq.slot = self._free_slots.pop()
            self._running[seq.slot] = seq
            active = max(1, min(len(self._lanes), len(self._running) // self._min_lane_tokens))
            min(self._lanes[:active], key=lambda lane: len(lane.seqs)).seqs.append(seq)
        self._update_gauges()

    def _build_batch(self, lane: _Lane) -> list[tuple[_Sequence, Any]]:
        """One SeqInput per sequence of an idle lane: the prompt for new ones, the last token for the rest."""
        cancelled = [seq for seq in lane.seqs if seq.stream.cancelled]
        for seq in cancelled:
            self._finish(seq, "abort")
            self._forget(seq)
        batch = []
        for seq in lane.seqs:
            prompt = seq.request.prompt_tokens
            if not seq.prefilled:
                tokens, pos = list(prompt), 0
            else:
                tokens, pos = [seq.generated[-1]], len(prompt) + len(seq.generated) - 1
            batch.append((seq, self._seq_input(slot=seq.slot, tokens=tokens, start_pos=pos,
                                               sampling=seq.request.sampling)))
        self._update_gauges()
        return batch

    def _update_gauges(self) -> None:
        """Running, waiting and KV-cache gauges from the current state (lock held)."""
        metrics.REQUESTS_WAITING.set(len(self._waiting))
        metrics.REQUESTS_RUNNING.set(len(self._running))
        used = sum(len(s.request.prompt_tokens) + len(s.generated) for s in self._running.values())
        metrics.KV_CACHE_USAGE.set(used / (self.max_batch_size * self.max_model_len))

    def _consume(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Append each sampled token, detokenize, apply stop rules, push chunks to the clients."""
        now = time.monotonic()
        metrics.GENERATION_TOKENS.inc(len(tokens))
        finished: list[_Sequence] = []
        for seq, token in zip(seqs, tokens, strict=True):
            request = seq.request
            if seq.generated:
                metrics.INTER_TOKEN.observe(now - seq.last_token_at)
            else:
                metrics.TTFT.observe(now - seq.admitted_at)
            seq.last_token_at = now
            seq.generated.append(token)
            reason: FinishReason | None = None
            stops_on_token = (token in self._eos and not request.ignore_eos) or token in request.stop_token_ids
            if stops_on_token:
                reason = "stop"
                seq.text += seq.detok.flush()
            else:
                seq.text += seq.detok.add(token)
                # Text before `emitted` was searched on earlier steps; only a match reaching into
                # the new text can be new.
                cut = find_stop(seq.text, request.stop, seq.emitted)
                if cut is not None:
                    seq.text = seq.text[:cut]
                    seq.emitted = min(seq.emitted, cut)
                    reason = "stop"
            if reason is None and (
                len(seq.generated) >= request.max_tokens
                or len(request.prompt_tokens) + len(seq.generated) >= self.max_model_len
            ):
                reason = "length"
                seq.text += seq.detok.flush()
            if reason is not None:
                finished.append(seq)
                self._finish(seq, reason, [token])
            else:
                end = len(seq.text) - stop_prefix_holdback(seq.text, request.stop)
                text = seq.text[seq.emitted:end]
                seq.emitted = max(seq.emitted, end)
                seq.stream.push(Chunk(text, [token], None, len(request.prompt_tokens), len(seq.generated)))
        if finished:
            self._release(finished)

    def _release(self, seqs: list[_Sequence], reason: FinishReason | None = None) -> None:
        """Free the slots of `seqs`; finish them with `reason` first when given."""
        if reason is not None:
            for seq in seqs:
                self._finish(seq, reason)
        with self._cond:
            for seq in seqs:
                self._forget(seq)
            self._update_gauges()

    def _forget(self, seq: _Sequence) -> None:
        """Take a finished sequence out of its slot and lane (lock held)."""
        if self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            self._free_slots.append(seq.slot)
        for lane in self._lanes:
            if seq in lane.seqs:
                lane.seqs.remove(seq)

    def _finish(self, seq: _Sequence, reason: FinishReason, token_ids: list[int] | None = None) -> None:
        """Send the final chunk of a sequence and record its metrics."""
        text = seq.text[seq.emitted:]
        seq.emitted = len(seq.text)
        seq.stream.push(
            Chunk(text, token_ids or [], reason, len(seq.request.prompt_tokens), len(seq.generated))
        )
        status = {"stop": metrics.STATUS_OK, "length": metrics.STATUS_OK, "abort": metrics.STATUS_CANCELLED}
        metrics.REQUESTS.labels(status=status.get(reason, metrics.STATUS_ERROR)).inc()
        metrics.REQUEST_DURATION.observe(time.monotonic() - seq.admitted_at)
