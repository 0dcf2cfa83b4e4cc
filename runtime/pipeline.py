"""Pipeline stages: what travels between them and how one stage handles one micro-batch.

The step plan travels *with* the activations: stage 0's TP ranks get it by a TP broadcast from
global rank 0, each later stage receives (header, plan, hidden states) by point-to-point recv
from the same TP rank of the stage before. Stages are therefore decoupled: stage 0 can start
micro-batch m+1 while stage 1 still works on m, which is what lets several micro-batches of
sequences be in flight in decode as well as in prefill. The last stage's TP rank 0 samples
and sends the tokens back to global rank 0.

Every header also carries the step's age: how long ago the step started for the whole pipeline,
a duration summed hop by hop on each rank's own clock (wall clocks of different nodes are not
comparable, durations are). A rank that receives a step's first micro-batch places the step's
start at `arrival - age` on its own clock; that anchors the bubble gauge (see StageIO).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from largemodel import metrics
from largemodel.runtime.model import ModelConfig
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.sampling import Sampler

KIND_STEP, KIND_NOOP, KIND_SHUTDOWN = 0, 1, 2
KINDS = (KIND_STEP, KIND_NOOP, KIND_SHUTDOWN)
HEADER_LEN = 6  # kind, rows, width, flags, step age in microseconds, block-table width
FLAG_LOGITS, FLAG_FIRST, FLAG_LAST = 1, 2, 4  # return logits; first / last micro-batch of a step
# slot, start_pos, length, top_k, seed (-1: none), temperature bits, top_p bits, new sequence (0/1)
META_COLS = 8


class PlanError(ValueError):
    """A received header or payload is not a micro-batch this stage can take (a peer running other
    code, or bytes that are not a plan); raised before anything is allocated from its sizes."""


class StageModel(Protocol):
    """What the engine needs of a stage: the native CausalLM, or DeepSpeed's model behind HFStage."""

    config: ModelConfig
    first: bool
    last: bool
    max_batch: int
    max_len: int

    def layout(self, slots: Tensor, start_pos: Tensor, lengths: Tensor, dtype: torch.dtype) -> Any: ...

    # The native CausalLM also takes `blocks=` (each row's block table) and has `num_blocks`,
    # `block_size` and `blocks_per_seq`: its KV cache is paged. A model without them keeps its own cache.

    def __call__(self, x: Tensor, layout: Any) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


@dataclass
class MicroBatch:
    """One micro-batch of sequences as every stage sees it."""

    kind: int
    slots: list[int]
    start_pos: list[int]
    lengths: list[int]
    tokens: list[list[int]]
    top_k: list[int]
    seeds: list[int | None]
    temperature: list[float]
    top_p: list[float]
    want_logits: bool = False
    first_of_step: bool = True
    last_of_step: bool = True
    step_age_us: int = 0  # time since the step started for the whole pipeline, when this was sent
    # rows that start a new sequence past position 0 (after a cached prefix): their samplers restart
    fresh: list[bool] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)  # each row's KV-cache block table (paged models)

    def is_fresh(self, row: int) -> bool:
        """Whether row `row` starts a new sequence: marked so, or at position 0."""
        return self.start_pos[row] == 0 or (row < len(self.fresh) and self.fresh[row])

    @property
    def table_width(self) -> int:
        """Blocks per row of the encoded block tables (rows padded to the longest)."""
        return max((len(b) for b in self.blocks), default=0)

    def padded_blocks(self) -> list[list[int]]:
        """Each row's block table padded with block 0 to table_width (padding reads are masked out)."""
        table = self.table_width
        return [b + [0] * (table - len(b)) for b in self.blocks]

    @property
    def width(self) -> int:
        """Padded token width T of this micro-batch."""
        return max(self.lengths, default=0)

    @property
    def phase(self) -> str:
        """'prefill' when any row brings more than one token, else 'decode'."""
        return "prefill" if self.width > 1 else "decode"

    def encode(self) -> tuple[Tensor, Tensor]:
        """(header, payload) int64 tensors; the payload's size follows from the header."""
        rows, width = len(self.slots), self.width
        flags = FLAG_LOGITS * self.want_logits + FLAG_FIRST * self.first_of_step + FLAG_LAST * self.last_of_step
        table = self.table_width
        header = torch.tensor([self.kind, rows, width, flags, self.step_age_us, table], dtype=torch.int64)
        meta = [[self.slots[i], self.start_pos[i], self.lengths[i], self.top_k[i],
                 -1 if self.seeds[i] is None else int(self.seeds[i] or 0),
                 _float_bits(self.temperature[i]), _float_bits(self.top_p[i]),
                 int(i < len(self.fresh) and self.fresh[i])]
                for i in range(rows)]
        padded = [t + [0] * (width - len(t)) for t in self.tokens]
        tables = self.padded_blocks()
        flat = [x for m in meta for x in m] + [x for t in padded for x in t] + [x for b in tables for x in b]
        return header, torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def control(cls, kind: int) -> MicroBatch:
        """An empty NOOP or SHUTDOWN message."""
        return cls(kind, [], [], [], [], [], [], [], [])

    @classmethod
    def decode(cls, header: Tensor, payload: Tensor) -> MicroBatch:
        """Inverse of encode(); PlanError if the two do not make one micro-batch."""
        size = payload_size(header)
        if payload.numel() != size:
            raise PlanError(f"payload has {payload.numel()} values, its header says {size}")
        kind, rows, width, flags, age_us, table = header.tolist()
        values = payload.tolist()
        meta = [values[i * META_COLS:(i + 1) * META_COLS] for i in range(rows)]
        bad = [m[2] for m in meta if not 0 < m[2] <= width]
        if bad:
            raise PlanError(f"row lengths {bad[:5]} outside 1..{width} (the header's width)")
        base = rows * META_COLS
        tokens = [values[base + i * width: base + i * width + m[2]] for i, m in enumerate(meta)]
        base += rows * width
        blocks = [values[base + i * table: base + (i + 1) * table] for i in range(rows)] if table else []
        return cls(
            fresh=[bool(m[7]) for m in meta] if any(m[7] for m in meta) else [], blocks=blocks,
            kind=kind, slots=[m[0] for m in meta], start_pos=[m[1] for m in meta], lengths=[m[2] for m in meta],
            tokens=tokens, top_k=[m[3] for m in meta], seeds=[None if m[4] < 0 else m[4] for m in meta],
            temperature=[_bits_float(m[5]) for m in meta], top_p=[_bits_float(m[6]) for m in meta],
            want_logits=bool(flags & FLAG_LOGITS), first_of_step=bool(flags & FLAG_FIRST),
            last_of_step=bool(flags & FLAG_LAST), step_age_us=age_us,
        )


def payload_size(header: Tensor, max_rows: int | None = None, max_width: int | None = None,
                 max_blocks: int | None = None) -> int:
    """Number of int64 values in the payload that follows `header`.

    PlanError unless the header is one encode() can write: HEADER_LEN values, a known kind, known
    flags, a non-negative age, no rows in a control message, and (when given) at most `max_rows`
    rows of at most `max_width` tokens and `max_blocks` table blocks, so a stray header cannot size an
    allocation.
    """
    values = header.tolist()
    if header.dim() != 1 or len(values) != HEADER_LEN:
        raise PlanError(f"header has shape {tuple(header.shape)}, expected ({HEADER_LEN},)")
    kind, rows, width, flags, age_us, table = values
    if kind not in KINDS:
        raise PlanError(f"header kind {kind} is not one of {KINDS}")
    if not 0 <= flags <= FLAG_LOGITS | FLAG_FIRST | FLAG_LAST or age_us < 0:
        raise PlanError(f"header flags {flags} or step age {age_us} us out of range")
    if rows < 0 or width < 0 or (rows == 0) != (width == 0) or (kind != KIND_STEP and rows) or table < 0 \
            or (table and not rows):
        raise PlanError(f"header of kind {kind} with {rows} rows of width {width} and {table} table blocks")
    if max_blocks is not None and table > max_blocks:
        raise PlanError(f"header has block tables of {table} blocks; this stage takes at most {max_blocks}")
    if (max_rows is not None and rows > max_rows) or (max_width is not None and width > max_width):
        raise PlanError(f"header has {rows} rows of width {width}; this stage takes at most {max_rows} rows "
                        f"of {max_width}")
    return rows * META_COLS + rows * width + rows * table


@dataclass
class StageIO:
    """Moves micro-batches in and out of one stage; keeps sends alive until they complete.

    It also keeps the bubble books of one step (seconds on this rank's `clock`, by default perf_counter): the
    window opens when the step starts for the whole pipeline (rank 0: the step's call; elsewhere:
    arrival of the step's first header minus the age it carries), or when this stage finished its
    previous micro-batch if that is later (a stage busy with an earlier step is not idle for this
    one). It closes when the stage finishes its last micro-batch of the step, or on global rank 0
    inside Engine.step when the step's last tokens are back (the drain). Bubble = 1 - busy / window.
    """

    ctx: ParallelContext
    model: StageModel
    clock: Callable[[], float] = time.perf_counter  # every time the bubble books use (tests inject one)
    pending_sends: list[Any] = field(default_factory=list)
    pending_dst: int = -1  # the global rank the pending sends go to (what the watchdog names)
    step_origin: float = 0.0  # when the step started for the whole pipeline: what the age is counted from
    step_start: float = 0.0  # the window's opening: step_origin, or this stage's last_end if later
    busy: float = 0.0
    last_end: float = 0.0

    def start_step(self, at: float) -> None:
        """Open the bubble window of a step that started for the pipeline at `at` (this rank's clock)."""
        self.step_origin, self.step_start, self.busy = at, max(at, self.last_end), 0.0

    def account(self, began: float, ended: float) -> None:
        """Count one micro-batch's compute on this stage as busy time."""
        self.busy += ended - began
        self.last_end = ended

    def close_step(self, ended: float) -> None:
        """Publish the step's idle fraction: (window - busy) / window, fill and drain included."""
        window = ended - self.step_start
        if window > 0:
            metrics.PIPELINE_BUBBLE.set(max(0.0, 1.0 - self.busy / window))

    def _stamp(self, mb: MicroBatch) -> None:
        """Write the step's age into the plan about to leave this rank (control messages carry 0)."""
        if mb.kind == KIND_STEP:
            mb.step_age_us = max(0, int((self.clock() - self.step_origin) * 1e6))

    def receive(self) -> tuple[MicroBatch, Tensor | None]:
        """Next micro-batch for this stage and, past stage 0, its incoming hidden states."""
        ctx, device = self.ctx, self.ctx.device
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
        prev = ctx.stage_rank(ctx.pp_rank - 1) if ctx.pp_rank > 0 else -1
        # Waiting for the next header is waiting for work: idle, not watched (runtime/watchdog.py).
        dog, ctx.idle = ctx.watchdog, True
        if dog is not None:
            dog.step_end()
        try:
            if ctx.pp_rank == 0:
                ctx.broadcast_tp(header)
            else:
                ctx.recv(header, prev)
        finally:
            ctx.idle = False
        if dog is not None:
            dog.step_begin()
        # The header's arrival anchors the step start; waiting for payload and hidden states is idle time.
        arrived = self.clock()
        size = payload_size(header.cpu(), self.model.max_batch, self.model.max_len,
                            getattr(self.model, "blocks_per_seq", 0))
        payload = torch.empty(size, dtype=torch.int64, device=device)
        if payload.numel():
            if ctx.pp_rank == 0:
                ctx.broadcast_tp(payload)
            else:
                ctx.recv(payload, prev)
        mb = MicroBatch.decode(header.cpu(), payload.cpu())
        if mb.kind == KIND_STEP and mb.first_of_step:
            self.start_step(arrived - mb.step_age_us / 1e6)
        hidden = None
        if mb.kind == KIND_STEP and ctx.pp_rank > 0:
            dtype = activation_dtype(self.model)
            hidden = torch.empty(len(mb.slots), mb.width, self.model.config.hidden_size, dtype=dtype, device=device)
            ctx.recv(hidden, prev)
        return mb, hidden

    def share_plan(self, mb: MicroBatch) -> None:
        """On stage 0's TP rank 0: give the plan to the other TP ranks of stage 0."""
        self._stamp(mb)
        header, payload = mb.encode()
        self.ctx.broadcast_tp(header.to(self.ctx.device))
        if payload.numel():
            self.ctx.broadcast_tp(payload.to(self.ctx.device))

    def send_next(self, mb: MicroBatch, hidden: Tensor | None) -> None:
        """Pass the plan (and hidden states) on to the same TP rank of the next stage."""
        self.wait_sends()
        self._stamp(mb)
        header, payload = mb.encode()
        dst = self.ctx.stage_rank(self.ctx.pp_rank + 1)
        self.pending_dst = dst
        tensors = [header, payload] if payload.numel() else [header]
        tensors = [t.to(self.ctx.device) for t in tensors] + ([hidden.contiguous()] if hidden is not None else [])
        # Keep each tensor referenced with its work: gloo reads it after isend returns.
        self.pending_sends = [(self.ctx.send(t, dst), t) for t in tensors]

    def wait_sends(self) -> None:
        """Block until every earlier send has left."""
        for work, _tensor in self.pending_sends:
            self.ctx.wait(work, "send", self.pending_dst)
        self.pending_sends = []


def activation_dtype(model: StageModel) -> torch.dtype:
    """The model dtype: that of its first floating-point parameter (GGML-block weights are uint8)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def run_stage(model: StageModel, mb: MicroBatch, hidden: Tensor | None, ctx: ParallelContext) -> Tensor:
    """This stage's forward over one micro-batch: hidden states, or logits on the last stage."""
    began, device = time.perf_counter(), ctx.device
    slots = torch.tensor(mb.slots, dtype=torch.int64, device=device)
    start = torch.tensor(mb.start_pos, dtype=torch.int64, device=device)
    lengths = torch.tensor(mb.lengths, dtype=torch.int64, device=device)
    dtype = activation_dtype(model)
    if hidden is None:
        width = mb.width
        x = torch.tensor([t + [0] * (width - len(t)) for t in mb.tokens], dtype=torch.int64, device=device)
    else:
        x = hidden
    with torch.inference_mode():
        if mb.blocks:
            blocks = torch.tensor(mb.padded_blocks(), dtype=torch.int64, device=device)
            layout = model.layout(slots, start, lengths, dtype, blocks=blocks)  # type: ignore[call-arg]
        else:
            layout = model.layout(slots, start, lengths, dtype)
        out = model(x, layout)
    metrics.STAGE_STEP_SECONDS.labels(stage=str(ctx.pp_rank), phase=mb.phase).observe(time.perf_counter() - began)
    return out


def finish_last_stage(ctx: ParallelContext, sampler: Sampler | None, mb: MicroBatch, logits: Tensor,
                      io: StageIO) -> tuple[list[int], Tensor | None] | None:
    """Sample on the last stage's TP rank 0; send the tokens (and logits if asked) to rank 0.

    Returns (tokens, logits) when this rank is global rank 0 itself (pp == 1), else None.
    """
    if ctx.tp_rank != 0 or sampler is None:
        return None
    for row, (slot, seed) in enumerate(zip(mb.slots, mb.seeds, strict=True)):
        if mb.is_fresh(row):
            sampler.reset(slot, seed)
    tokens = sampler.sample(logits, mb.slots, mb.temperature, mb.top_k, mb.top_p)
    if ctx.rank == 0:
        return tokens, logits if mb.want_logits else None
    io.wait_sends()
    out = [torch.tensor(tokens, dtype=torch.int64, device=ctx.device)]
    if mb.want_logits:
        out.append(logits.float().contiguous())
    io.pending_sends, io.pending_dst = [(ctx.send(t, 0), t) for t in out], 0
    return None
