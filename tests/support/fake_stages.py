"""In-process pipeline fakes: a clock per rank, an in-memory wire between ranks, a stage that only takes time.

With these the real StageIO, Engine and worker_loop run a pp world in one process (rank 0 on the
test's thread, the others on threads) with no process group, and every time they read is exact:

- each rank has its own FakeClock, `offset` seconds ahead of a shared true timeline (clocks of
  different nodes disagree; only durations carry over);
- time passes on a rank only while its TimedStage computes (`cost` seconds per micro-batch) or
  while it waits for a message: a receive returns at max(now, the message's send time), in the
  receiver's own clock;
- sends complete at once.

Every clock value depends only on the messages a rank gets, not on how the threads are scheduled,
so the bubble values such a world publishes are exact numbers a test can write down.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from largemodel.runtime.model import ModelConfig
from largemodel.runtime.parallel import ParallelContext

WAIT_S = 10.0  # a receive that waits longer than this is a test bug (nothing was sent): fail, do not hang


class FakeClock:
    """One rank's clock: `now` moves only when told; `offset` is its lead over the true timeline."""

    def __init__(self, now: float = 0.0, offset: float = 0.0) -> None:
        self.now, self.offset = now, offset

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def true_time(self) -> float:
        return self.now - self.offset

    def wait_until(self, true_time: float) -> None:
        """A message sent at `true_time` arrives: no earlier than now, in this clock's terms."""
        self.now = max(self.now, true_time + self.offset)


class Wire:
    """FIFO channels between in-process ranks, one per (src, dst); each message keeps its send time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[tuple[int, int], queue.Queue[tuple[float, Tensor]]] = {}
        self.sent: list[tuple[int, int, Tensor]] = []  # (src, dst, tensor) in send order

    def channel(self, src: int, dst: int) -> queue.Queue[tuple[float, Tensor]]:
        with self._lock:
            return self._channels.setdefault((src, dst), queue.Queue())

    def put(self, src: int, dst: int, true_time: float, tensor: Tensor) -> None:
        with self._lock:
            self.sent.append((src, dst, tensor.clone()))
        self.channel(src, dst).put((true_time, tensor.clone()))

    def take(self, src: int, dst: int, into: Tensor, clock: FakeClock) -> None:
        true_time, tensor = self.channel(src, dst).get(timeout=WAIT_S)
        assert tensor.shape == into.shape and tensor.dtype == into.dtype, \
            f"rank {dst} posted {tuple(into.shape)} {into.dtype} for {tuple(tensor.shape)} {tensor.dtype} from {src}"
        into.copy_(tensor)
        clock.wait_until(true_time)


class Done:
    """The work of a send that has left."""

    def wait(self) -> None:
        return None


@dataclass
class Receive:
    """The work of a posted receive: waiting takes the message off the wire."""

    ctx: WiredContext
    tensor: Tensor
    src: int

    def wait(self) -> None:
        self.ctx.recv(self.tensor, self.src)


@dataclass
class WiredContext(ParallelContext):
    """A ParallelContext whose point-to-point ops go over a Wire; tp must be 1 (no TP collectives).

    `waits` lists every ctx.wait(op, peer) StageIO and the Engine made, in order.
    """

    wire: Wire = field(default_factory=Wire)
    clock: FakeClock = field(default_factory=FakeClock)
    waits: list[tuple[str, int]] = field(default_factory=list)

    def send(self, tensor: Tensor, dst: int) -> Any:
        self.wire.put(self.rank, dst, self.clock.true_time(), tensor)
        return Done()

    def irecv(self, tensor: Tensor, src: int) -> Any:
        return Receive(self, tensor, src)

    def recv(self, tensor: Tensor, src: int) -> Tensor:
        self.wire.take(src, self.rank, tensor, self.clock)
        return tensor

    def wait(self, work: Any, op: str, peer: int) -> None:
        self.waits.append((op, peer))
        work.wait()


def small_config(vocab: int = 64, hidden: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=2,
                       num_attention_heads=1, eos_token_id=None)


class TimedStage(nn.Module):
    """A StageModel that computes nothing but takes `cost` seconds of its rank's clock per micro-batch.

    Hidden states carry each row's token ids; the last stage's logits pick (last token + 1) % vocab,
    so a test can tell that plan, hidden states and answer stayed together.
    """

    def __init__(self, config: ModelConfig, *, first: bool, last: bool, cost: float, clock: FakeClock,
                 max_batch: int = 8, max_len: int = 64) -> None:
        super().__init__()
        self.config, self.first, self.last = config, first, last
        self.cost, self.clock = cost, clock
        self.max_batch, self.max_len = max_batch, max_len
        self.weight = nn.Parameter(torch.zeros(1))

    def layout(self, slots: Tensor, start_pos: Tensor, lengths: Tensor, dtype: torch.dtype) -> Any:
        return lengths

    def forward(self, x: Tensor, layout: Any) -> Tensor:
        self.clock.advance(self.cost)
        ids = x.float() if x.dim() == 2 else x[..., 0]
        if not self.last:
            return ids[..., None].expand(*ids.shape, self.config.hidden_size).contiguous()
        rows = torch.arange(ids.shape[0])
        nxt = (ids[rows, layout - 1].long() + 1) % self.config.vocab_size
        logits = torch.zeros(ids.shape[0], self.config.vocab_size)
        logits[rows, nxt] = 1.0
        return logits
