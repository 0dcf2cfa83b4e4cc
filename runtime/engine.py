"""The Engine the scheduler drives on global rank 0, and the loop every other rank runs.

`Engine.submit` starts one micro-batch of sequences (prefills and decodes mixed) through the
pipeline and returns a ticket; `Engine.result` waits for that micro-batch's sampled tokens, one
per sequence. A caller (the scheduler) keeps several independent micro-batches in flight that way,
so the stages work on different ones at once. `Engine.step` is the same path for callers that
want one whole batch now: it splits the batch into `micro_batch_count` micro-batches, submits them
one after another (stage 0 starts micro-batch m+1 while stage 1 runs m) and collects their results.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from largemodel.runtime import kvmetrics
from largemodel.runtime.kvblocks import BlockError, BlockManager
from largemodel.runtime.parallel import DEFAULT_PG_TIMEOUT_S, PG_TIMEOUT_ENV, ParallelContext
from largemodel.runtime.pipeline import (
    KIND_NOOP,
    KIND_SHUTDOWN,
    KIND_STEP,
    MicroBatch,
    StageIO,
    StageModel,
    finish_last_stage,
    run_stage,
)
from largemodel.runtime.sampling import Sampler

log = logging.getLogger(__name__)

MIN_MICRO_BATCH_TOKENS_ENV = "LARGEMODEL_MIN_MICRO_BATCH_TOKENS"
# A decode micro-batch reads every weight once whatever its size, so splitting a small decode batch
# multiplies weight traffic (measured: 16 sequences in 4 micro-batches decode at half the speed of
# 1); a step is split only when each micro-batch still carries this many tokens (prefill does).
DEFAULT_MIN_MICRO_BATCH_TOKENS = 128


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token: temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class SeqInput:
    """New tokens of one sequence for one step; start_pos 0 starts a new sequence in `slot`.

    `new_sequence`: this is the first prefill of a sequence begun with `Engine.start_sequence`, which
    starts after its cached prefix (start_pos > 0).
    """

    slot: int
    tokens: list[int]
    start_pos: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    new_sequence: bool = False


# Bounds of what a sequence may ask for; the API refuses more before it gets here (protocol.py).
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1


class EngineError(ValueError):
    """A step's input is invalid (slot, positions, token ids, sampling values); the message says which."""


Ticket = int  # one submitted micro-batch, redeemed once with Engine.result


def micro_batch_count(new_tokens: int, micro_batches: int, min_tokens: int) -> int:
    """Into how many micro-batches (scheduler: lanes) a step carrying `new_tokens` tokens splits.

    At most `micro_batches`, and only as many as keep `min_tokens` tokens each: a micro-batch
    re-reads every weight of its stage, so a small split step reads the weights again for nothing.
    The one rule for both Engine.step and the scheduler's lanes (a decode step: one token a sequence).
    """
    return max(1, min(micro_batches, new_tokens // max(1, min_tokens)))


def split_micro_batches(batch: list[SeqInput], micro_batches: int) -> list[list[SeqInput]]:
    """Contiguous, near-equal chunks of `batch`, at most `micro_batches` of them."""
    count = max(1, min(micro_batches, len(batch)))
    size, extra = divmod(len(batch), count)
    chunks, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        chunks.append(batch[start:stop])
        start = stop
    return chunks


# A micro-batch is padded to its longest row; rows whose padding would cost more than this many tokens
# (and more than half the real ones) travel as a micro-batch of their own. A split costs one more
# pass over the weights, about 7 tokens of compute for SmolLM2 on 2 CPU cores; padding 13 decode rows
# to a 1,075-token prefill cost 14x the prefill (measured: 24 s prefill steps of a 2 s prompt).
MIN_PADDING_SPLIT_TOKENS = 32


def padding_groups(batch: list[SeqInput]) -> list[list[int]]:
    """Indices of `batch` grouped so that padding each group to its longest row wastes little: longest
    rows first, a row starts a new group when joining would pad more than MIN_PADDING_SPLIT_TOKENS and
    more than half the group's real tokens (a prefill and the decodes beside it go apart)."""
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i].tokens))
    groups: list[list[int]] = []
    width = real = 0
    for i in order:
        n = len(batch[i].tokens)
        if groups:
            waste = width * (len(groups[-1]) + 1) - (real + n)
            if waste <= max(MIN_PADDING_SPLIT_TOKENS, (real + n) // 2):
                groups[-1].append(i)
                real += n
                continue
        groups.append([i])
        width, real = n, n
    return groups


class Engine:
    """Drives the rank group from global rank 0; the only object the serving layer talks to."""

    def __init__(self, model: StageModel, ctx: ParallelContext, *, micro_batches: int = 1,
                 eos_token_ids: list[int] | None = None, heartbeat_s: float | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 min_micro_batch_tokens: int | None = None, prefix_cache: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`clock`: the seconds the pipeline bubble books are kept in (StageIO); tests inject a fake.

        A model with a paged KV cache (the native CausalLM) gets its block tables from a BlockManager
        here, reusing cached prompt prefixes when `prefix_cache`; other models keep their own caches.
        """
        assert ctx.rank == 0, "the Engine lives on global rank 0; other ranks run worker_loop()"
        self.model, self.ctx = model, ctx
        self.max_batch_size, self.max_model_len = model.max_batch, model.max_len
        self.vocab_size = model.config.vocab_size
        self.micro_batches = max(1, micro_batches)
        self.min_micro_batch_tokens = max(1, min_micro_batch_tokens or int(
            os.environ.get(MIN_MICRO_BATCH_TOKENS_ENV, DEFAULT_MIN_MICRO_BATCH_TOKENS)))
        self.eos_token_ids = list(eos_token_ids if eos_token_ids is not None else model.config.eos_ids)
        self._on_fatal = on_fatal
        num_blocks = int(getattr(model, "num_blocks", 0) or 0)
        self.blocks = BlockManager(num_blocks, int(getattr(model, "block_size", 0)), self.max_batch_size,
                                   int(getattr(model, "blocks_per_seq", 0)), prefix_cache) if num_blocks else None
        if self.blocks is not None:
            kvmetrics.cache_config(self.blocks.block_size, num_blocks, prefix_cache)
            log.info("event=kv_cache blocks=%d block_size=%d prefix_cache=%s", num_blocks, self.blocks.block_size,
                     prefix_cache)
        self._io = StageIO(ctx, model, clock)
        self._sampler = Sampler(self.max_batch_size) if ctx.pp == 1 else None
        self._lock = threading.RLock()
        self._next_ticket: Ticket = 0
        self._in_flight: dict[Ticket, tuple[list[Any], Tensor, Tensor | None]] = {}
        self._done: dict[Ticket, tuple[list[int], Tensor | None]] = {}
        self._split: dict[Ticket, tuple[list[Ticket], list[int]]] = {}  # batch ticket -> its micro-batches, row order
        self._last_activity = time.monotonic()
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if ctx.tp * ctx.pp > 1:
            # Idle workers block in recv/broadcast, which time out with the process group:
            # a NOOP through every stage well inside the timeout keeps an idle group alive.
            timeout = float(os.environ.get(PG_TIMEOUT_ENV, DEFAULT_PG_TIMEOUT_S))
            self._heartbeat_s = heartbeat_s or timeout / 4
            self._heartbeat = threading.Thread(target=self._beat, name="engine-heartbeat", daemon=True)
            self._heartbeat.start()

    def validate(self, batch: list[SeqInput]) -> None:
        """Raise EngineError unless every input fits the engine's limits."""
        if not batch:
            raise EngineError("batch is empty")
        seen: set[int] = set()
        for seq in batch:
            if not 0 <= seq.slot < self.max_batch_size:
                raise EngineError(f"slot {seq.slot} is outside 0..{self.max_batch_size - 1}")
            if seq.slot in seen:
                raise EngineError(f"slot {seq.slot} appears twice in one step")
            seen.add(seq.slot)
            if not seq.tokens:
                raise EngineError(f"slot {seq.slot}: no tokens")
            if seq.start_pos < 0 or seq.start_pos + len(seq.tokens) > self.max_model_len:
                raise EngineError(f"slot {seq.slot}: positions {seq.start_pos}..{seq.start_pos + len(seq.tokens) - 1} "
                                  f"exceed max_model_len={self.max_model_len}")
            bad = [t for t in seq.tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise EngineError(f"slot {seq.slot}: token ids {bad[:5]} outside the vocabulary 0..{self.vocab_size - 1}")
            s = seq.sampling
            if not (math.isfinite(s.temperature) and s.temperature >= 0 and 0 <= s.top_k <= MAX_TOP_K
                    and 0.0 < s.top_p <= 1.0):
                raise EngineError(f"slot {seq.slot}: need finite temperature >= 0, 0 <= top_k <= {MAX_TOP_K}, "
                                  f"0 < top_p <= 1, got {s}")
            if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
                raise EngineError(f"slot {seq.slot}: seed {s.seed} is outside 0..{MAX_SEED}")
        # The plan travels as int64 tensors: build it now, before any rank sees it, so input that
        # cannot be encoded fails this batch and never the collectives (and so never the group).
        try:
            self._plan(batch, False, True, True).encode()
        except (RuntimeError, OverflowError, TypeError, ValueError) as exc:
            raise EngineError(f"batch cannot be encoded for the pipeline: {exc}") from None

    def start_sequence(self, slot: int, prompt: list[int]) -> int:
        """A new sequence in `slot` (the one there is released): returns how many of its prompt tokens
        the prefix cache already holds; its first SeqInput starts there with new_sequence=True."""
        if not 0 <= slot < self.max_batch_size:
            raise EngineError(f"slot {slot} is outside 0..{self.max_batch_size - 1}")
        with self._lock:
            if self.blocks is None:
                return 0
            hit = self.blocks.start(slot, list(prompt))
            if self.blocks.prefix_cache:
                kvmetrics.prefix_lookup(len(prompt), hit)
            return hit

    def cached_prefix(self, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens the prefix cache holds now (takes and counts nothing)."""
        with self._lock:
            return self.blocks.peek(list(prompt)) if self.blocks is not None else 0

    def end_sequence(self, slot: int) -> None:
        """The sequence in `slot` is finished: its KV blocks go back (the full ones stay cached)."""
        with self._lock:
            if self.blocks is not None:
                self.blocks.release(slot)

    def kv_usage(self) -> tuple[int, int]:
        """(blocks running sequences hold, all blocks); (0, 0) for a model with its own cache.

        Lock-free (a gauge may be a step stale): callers hold the scheduler's lock, which must never
        wait for a pipeline step."""
        blocks = self.blocks
        return (blocks.used_blocks, blocks.num_blocks) if blocks is not None else (0, 0)

    def _plan(self, batch: list[SeqInput], want_logits: bool, first: bool, last: bool,
              blocks: list[list[int]] | None = None) -> MicroBatch:
        return MicroBatch(
            fresh=[s.new_sequence for s in batch] if any(s.new_sequence for s in batch) else [],
            blocks=blocks or [],
            kind=KIND_STEP, slots=[s.slot for s in batch], start_pos=[s.start_pos for s in batch],
            lengths=[len(s.tokens) for s in batch], tokens=[list(s.tokens) for s in batch],
            top_k=[s.sampling.top_k for s in batch], seeds=[s.sampling.seed for s in batch],
            temperature=[float(s.sampling.temperature) for s in batch], top_p=[float(s.sampling.top_p) for s in batch],
            want_logits=want_logits, first_of_step=first, last_of_step=last,
        )

    def step(self, batch: list[SeqInput]) -> list[int]:
        """One next token per input, in input order; prefill and decode may mix."""
        return self._step(batch, want_logits=False)[0]

    def step_with_logits(self, batch: list[SeqInput]) -> tuple[list[int], Tensor]:
        """Like step(), also returning the float32 logits [len(batch), vocab] the tokens came from."""
        tokens, logits = self._step(batch, want_logits=True)
        assert logits is not None
        return tokens, logits

    def _step(self, batch: list[SeqInput], want_logits: bool) -> tuple[list[int], Tensor | None]:
        self.validate(batch)
        with self._lock, self._group_failures():
            # The step starts for the whole pipeline here; its bubble window on this stage closes only
            # once the last tokens are back, so stage 0's idle time during the drain is counted.
            self._io.start_step(self._io.clock())
            new_tokens = sum(len(s.tokens) for s in batch)
            chunks = split_micro_batches(batch, micro_batch_count(new_tokens, self.micro_batches,
                                                                  self.min_micro_batch_tokens))
            tickets = [self._submit(c, want_logits, i == 0, i == len(chunks) - 1, close=False)
                       for i, c in enumerate(chunks)]
            results = [self._result(t) for t in tickets]
            self._io.close_step(self._io.clock())
        tokens = [t for r in results for t in r[0]]
        logits = torch.cat([r[1] for r in results if r[1] is not None]) if want_logits else None
        return tokens, logits

    def submit(self, batch: list[SeqInput]) -> Ticket:
        """Start one batch through the pipeline without waiting; returns a ticket for result().

        Rows of very different lengths (a long prefill beside decodes) go as separate micro-batches
        (padding_groups), so no row is padded to another's length; result() returns input order.
        """
        self.validate(batch)
        with self._lock, self._group_failures():
            self._io.start_step(self._io.clock())
            groups = padding_groups(batch)
            if len(groups) == 1:
                return self._submit(batch, False, True, True)
            parts = [self._submit([batch[i] for i in g], False, k == 0, k == len(groups) - 1)
                     for k, g in enumerate(groups)]
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._split[ticket] = (parts, [i for g in groups for i in g])
            return ticket

    def _submit(self, batch: list[SeqInput], want_logits: bool, first: bool, last: bool,
                close: bool = True) -> Ticket:
        """Run stage 0 on one micro-batch and send it on; `close`: end its bubble window at the compute's end."""
        if self._closed:
            raise EngineError("engine is shut down")
        tables = None
        if self.blocks is not None:
            try:
                tables = [self.blocks.extend(s.slot, s.start_pos, list(s.tokens)) for s in batch]
            except BlockError as exc:
                raise EngineError(str(exc)) from None
        mb = self._plan(batch, want_logits, first, last, tables)
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        began = self._io.clock()
        self._io.share_plan(mb)
        out = run_stage(self.model, mb, None, self.ctx)
        ended = self._io.clock()
        self._io.account(began, ended)
        if last and close:
            self._io.close_step(ended)
        if self._sampler is not None:
            done = finish_last_stage(self.ctx, self._sampler, mb, out, self._io)
            assert done is not None
            self._done[ticket] = done
        else:
            self._io.send_next(mb, out)
            # Post the receive for the answer now: the last stage's send completes only once a
            # receive is posted, and it must never wait on rank 0 while rank 0 feeds stage 0.
            src, device = self.ctx.stage_rank(self.ctx.pp - 1, 0), self.ctx.device
            tokens = torch.empty(len(mb.slots), dtype=torch.int64, device=device)
            works = [self.ctx.irecv(tokens, src)]
            logits = None
            if want_logits:
                logits = torch.empty(len(mb.slots), self.vocab_size, dtype=torch.float32, device=device)
                works.append(self.ctx.irecv(logits, src))
            self._in_flight[ticket] = (works, tokens, logits)
        self._last_activity = time.monotonic()
        return ticket

    def result(self, ticket: Ticket) -> list[int]:
        """The sampled tokens of a submitted batch, in its input order; waits for it to leave the pipeline."""
        with self._lock:
            split = self._split.pop(ticket, None)
        if split is None:
            return self._result(ticket)[0]
        parts, order = split
        tokens = [0] * len(order)
        for row, token in zip(order, (t for part in parts for t in self._result(part)[0]), strict=True):
            tokens[row] = token
        return tokens

    def _result(self, ticket: Ticket) -> tuple[list[int], Tensor | None]:
        """Tokens (and logits if asked) of a submitted micro-batch."""
        with self._lock, self._group_failures():
            if ticket in self._in_flight:
                works, tokens, logits = self._in_flight.pop(ticket)
                for work in works:
                    self.ctx.wait(work, "recv", self.ctx.stage_rank(self.ctx.pp - 1, 0))
                self._done[ticket] = (tokens.tolist(), logits)
            if ticket not in self._done:
                raise KeyError(f"unknown ticket {ticket}")
            self._last_activity = time.monotonic()
            return self._done.pop(ticket)

    @contextmanager
    def _group_failures(self) -> Iterator[None]:
        """A failed collective means a lost peer: hand it to on_fatal (the launcher exits) if set."""
        try:
            yield
        except RuntimeError as exc:
            if self._on_fatal is None:
                raise
            self._closed = True
            self._on_fatal(exc)
            raise

    def _send_control(self, kind: int) -> None:
        mb = MicroBatch.control(kind)
        self._io.share_plan(mb)
        if self.ctx.pp > 1:
            self._io.send_next(mb, None)
        self._io.wait_sends()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s / 2):
            with self._lock, self._group_failures():
                if self._closed:
                    return
                if time.monotonic() - self._last_activity >= self._heartbeat_s / 2:
                    self._send_control(KIND_NOOP)
                    self._last_activity = time.monotonic()

    def shutdown(self) -> None:
        """Finish what is in flight, then tell every rank to leave its loop. Idempotent."""
        self._stop.set()
        with self._lock, self._group_failures():
            if self._closed:
                return
            for ticket in sorted(self._in_flight):
                self._result(ticket)
            self._send_control(KIND_SHUTDOWN)
            self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        log.info("event=engine_shutdown rank=0")


def worker_loop(model: StageModel, ctx: ParallelContext, clock: Callable[[], float] = time.perf_counter) -> None:
    """Every rank but global rank 0: run stage micro-batches as they come until SHUTDOWN.

    `clock`: the seconds this stage's bubble books are kept in (StageIO); tests inject a fake.
    """
    io = StageIO(ctx, model, clock)
    sampler = Sampler(model.max_batch) if model.last and ctx.tp_rank == 0 else None
    log.info("event=worker_ready rank=%d stage=%d tp_rank=%d", ctx.rank, ctx.pp_rank, ctx.tp_rank)
    while True:
        mb, hidden = io.receive()
        if mb.kind != KIND_STEP:
            if not model.last:
                io.send_next(mb, None)
            if mb.kind == KIND_SHUTDOWN:
                io.wait_sends()
                log.info("event=worker_shutdown rank=%d", ctx.rank)
                return
            assert mb.kind == KIND_NOOP, f"unknown message kind {mb.kind}"
            continue
        began = io.clock()
        out = run_stage(model, mb, hidden, ctx)
        ended = io.clock()
        io.account(began, ended)
        if mb.last_of_step:
            io.close_step(ended)
        if not model.last:
            io.send_next(mb, out)
        else:
            finish_last_stage(ctx, sampler, mb, out, io)
