"""Tensor parallelism as a transformation of the model, and every collective the runtime issues.

`apply_tensor_parallel` swaps a stage's projections for shards (column-parallel q/k/v and
gate/up, row-parallel o and down with one all-reduce after each; vocab-parallel embedding and
LM head) and returns which slice of each checkpoint tensor the rank must read. Every
collective goes through `ParallelContext`, which counts calls and bytes and times a sampled
subset into the Prometheus metrics, labelled by op, group (tp|pp) and backend.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from largemodel import metrics, modelfacts
from largemodel.runtime.model import CausalLM, ModelConfig

log = logging.getLogger(__name__)

SAMPLE_EVERY_ENV = "LARGEMODEL_COLLECTIVE_SAMPLE_EVERY"
PG_TIMEOUT_ENV = "LARGEMODEL_PG_TIMEOUT_S"
# Timing every collective would add two clock reads and a histogram update per all-reduce;
# one in 16 keeps that far below 1% of a decode step while filling the histogram quickly.
DEFAULT_SAMPLE_EVERY = 16
DEFAULT_PG_TIMEOUT_S = 300.0


class TensorParallelError(ValueError):
    """The model cannot be split `tp` ways; the message lists the tp values that work."""


@dataclass(frozen=True)
class Shard:
    """Which part of a checkpoint tensor one rank holds.

    Rows (dim 0) or columns (dim 1) `start:stop`; a stop past the tensor's size means zero
    padding (vocab padded to a multiple of tp). `zero` marks a row-parallel bias that only
    tp rank 0 adds, so the all-reduce counts it once.
    """

    dim: int
    start: int
    stop: int
    zero: bool = False


@dataclass
class _CollectiveStats:
    """Prometheus children cached per (op, group): `labels()` is too slow for every all-reduce."""

    calls: Any
    bytes: Any
    seconds: Any
    count: int = 0


@dataclass
class ParallelContext:
    """This rank's place in the group and its process groups; all collectives go through it."""

    tp: int = 1
    pp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Any = None
    pp_group: Any = None
    sample_every: int = field(default_factory=lambda: int(os.environ.get(SAMPLE_EVERY_ENV, DEFAULT_SAMPLE_EVERY)))
    # Issue 17: the rank's collective watchdog (runtime/watchdog.py), told what every blocking
    # collective waits on; `idle` marks a wait for new work (the next header), which is not a hang.
    watchdog: Any = None
    idle: bool = False
    _stats: dict[tuple[str, str], _CollectiveStats] = field(default_factory=dict)
    _pending_events: list[tuple[Any, Any, Any]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Global rank: stage-major, so a stage's TP ranks are contiguous."""
        return self.pp_rank * self.tp + self.tp_rank

    def stage_rank(self, stage: int, tp_rank: int | None = None) -> int:
        """Global rank of `tp_rank` (default: this rank's) in pipeline stage `stage`."""
        return stage * self.tp + (self.tp_rank if tp_rank is None else tp_rank)

    def _track(self, op: str, group: str, tensor: Tensor) -> tuple[_CollectiveStats, bool]:
        stats = self._stats.get((op, group))
        if stats is None:
            labels = {"op": op, "group": group, "backend": self.backend}
            stats = _CollectiveStats(
                metrics.COLLECTIVE_CALLS.labels(**labels), metrics.COLLECTIVE_BYTES.labels(**labels),
                metrics.COLLECTIVE_SECONDS.labels(**labels),
            )
            self._stats[(op, group)] = stats
        stats.count += 1
        stats.calls.inc()
        stats.bytes.inc(tensor.numel() * tensor.element_size())
        return stats, self.sample_every > 0 and stats.count % self.sample_every == 0

    def _peers(self) -> str:
        """The other ranks of this stage's TP group (what a TP collective waits on)."""
        return ",".join(str(self.stage_rank(self.pp_rank, i)) for i in range(self.tp) if i != self.tp_rank)

    def _timed(self, op: str, group: str, tensor: Tensor, run: Any, peer: str = "") -> Any:
        dog = None if self.idle else self.watchdog
        if dog is None:
            return self._measure(op, group, tensor, run)
        dog.begin(op, group, peer or self._peers())
        try:
            return self._measure(op, group, tensor, run)
        finally:
            dog.end()

    def wait(self, work: Any, op: str, peer: int) -> None:
        """Wait for an isend/irecv to `peer` (global rank) to complete, under the watchdog."""
        dog = self.watchdog
        if dog is None:
            work.wait()
            return
        dog.begin(op, "pp", str(peer))
        try:
            work.wait()
        finally:
            dog.end()

    def _measure(self, op: str, group: str, tensor: Tensor, run: Any) -> Any:
        stats, sampled = self._track(op, group, tensor)
        if not sampled:
            return run()
        if self.device.type == "cuda":
            # CUDA events: the host must not wait for the GPU just to time a collective.
            self._drain_events()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = run()
            end.record()
            self._pending_events.append((start, end, stats.seconds))
            return result
        began = time.perf_counter()
        result = run()
        stats.seconds.observe(time.perf_counter() - began)
        return result

    def _drain_events(self) -> None:
        still = []
        for start, end, histogram in self._pending_events:
            if end.query():
                histogram.observe(start.elapsed_time(end) / 1000.0)
            else:
                still.append((start, end, histogram))
        self._pending_events = still

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` in place across this stage's TP ranks."""
        if self.tp > 1:
            self._timed("all_reduce", "tp", tensor, lambda: dist.all_reduce(tensor, group=self.tp_group))
        return tensor

    def all_gather_last_dim(self, tensor: Tensor) -> Tensor:
        """Concatenate every TP rank's `tensor` along the last dimension, in tp-rank order."""
        if self.tp == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.tp)]
        self._timed("all_gather", "tp", tensor, lambda: dist.all_gather(parts, tensor.contiguous(), group=self.tp_group))
        return torch.cat(parts, dim=-1)

    def broadcast_tp(self, tensor: Tensor) -> Tensor:
        """Broadcast from this stage's TP rank 0 to the other TP ranks, in place."""
        if self.tp > 1:
            src = self.stage_rank(self.pp_rank, 0)
            self._timed("broadcast", "tp", tensor, lambda: dist.broadcast(tensor, src=src, group=self.tp_group))
        return tensor

    def send(self, tensor: Tensor, dst: int) -> Any:
        """Start sending `tensor` to global rank `dst`; returns the work to wait on."""
        self._track("send", "pp", tensor)
        return dist.isend(tensor, dst=dst, group=self.pp_group)

    def irecv(self, tensor: Tensor, src: int) -> Any:
        """Post a receive of `tensor` from global rank `src`; returns the work to wait on."""
        self._track("recv", "pp", tensor)
        return dist.irecv(tensor, src=src, group=self.pp_group)

    def recv(self, tensor: Tensor, src: int) -> Tensor:
        """Receive `tensor` from global rank `src`, blocking."""
        self._timed("recv", "pp", tensor, lambda: dist.recv(tensor, src=src, group=self.pp_group), str(src))
        return tensor


_LIVE_STORES: list[dist.Store] = []


def rendezvous_store(rank: int, master_addr: str, master_port: int, timeout: timedelta, bind_host: str = "",
                     secret: bytes = b"") -> dist.Store:
    """The group's rendezvous store (runtime/rendezvous.py): rank 0 serves it on `bind_host` only
    ("" = every interface) and admits only peers that prove the group secret; every rank, rank 0
    included, is its client."""
    from largemodel.runtime.rendezvous import GroupStore, StoreServer

    if not secret:
        log.warning("event=store_no_secret detail=no group secret is set; store peers prove only that they "
                    "speak the protocol")
    server = StoreServer.serve(bind_host, master_port, secret) if rank == 0 else None
    store = GroupStore(master_addr, master_port, secret, timeout)
    store.server = server  # rank 0's server lives as long as its store
    # torch keeps only the C++ half of a Python Store: once the Python object is collected, every
    # later new_group (DeepSpeed makes its own) finds no `set` to call. It lives as long as the process.
    _LIVE_STORES.append(store)
    return store


def init_distributed(rank: int, world_size: int, tp: int, pp: int, master_addr: str, master_port: int,
                     timeout_s: float | None = None, bind_host: str | None = None,
                     secret: bytes = b"") -> ParallelContext:
    """Join the default group (nccl on GPU, gloo on CPU) and create the TP and PP subgroups.

    `bind_host` (not None): rank 0 serves the group's authenticated rendezvous store on that address
    only, admitting ranks that hold `secret`; None (tests and benches on loopback): torch's TCPStore.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=timeout_s or float(os.environ.get(PG_TIMEOUT_ENV, DEFAULT_PG_TIMEOUT_S)))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if bind_host is None:
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timeout)
    else:
        store = rendezvous_store(rank, master_addr, master_port, timeout, bind_host, secret)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    ctx = ParallelContext(tp=tp, pp=pp, tp_rank=rank % tp, pp_rank=rank // tp, backend=backend, device=device)
    # Every rank must create every group, in the same order.
    for stage in range(pp):
        group = dist.new_group([stage * tp + i for i in range(tp)], timeout=timeout)
        if stage == ctx.pp_rank:
            ctx.tp_group = group
    for tp_rank in range(tp):
        group = dist.new_group([stage * tp + tp_rank for stage in range(pp)], timeout=timeout)
        if tp_rank == ctx.tp_rank:
            ctx.pp_group = group
    log.info("event=dist_ready rank=%d world=%d tp=%d pp=%d backend=%s timeout_s=%.0f",
             rank, world_size, tp, pp, backend, timeout.total_seconds())
    return ctx


def valid_tp_sizes(config: ModelConfig, limit: int = 64) -> list[int]:
    """The tp values this runtime accepts for a model (largemodel.modelfacts' rule, shared with the planner)."""
    return modelfacts.valid_tensor_sizes(heads=config.num_attention_heads, kv_heads=config.kv_heads,
                                         intermediate=config.intermediate_size, limit=limit)


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise TensorParallelError unless heads split evenly, KV heads split or replicate evenly and the MLP splits."""
    problem = modelfacts.tensor_problem(heads=config.num_attention_heads, kv_heads=config.kv_heads,
                                        intermediate=config.intermediate_size, tp=tp)
    if problem:
        raise TensorParallelError(f"{problem}; valid tp: {', '.join(map(str, valid_tp_sizes(config, 16)))}")


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over TP ranks; tokens outside a rank's rows contribute zeros."""

    def __init__(self, rows: int, dim: int, start: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim, device="meta"))
        self.start, self.ctx = start, ctx

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ctx.all_reduce(out.masked_fill(outside[..., None], 0.0))


class VocabParallelLMHead(nn.Module):
    """LM head rows split over TP ranks; logits are gathered and the vocab padding cut off."""

    def __init__(self, rows: int, dim: int, vocab: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim, device="meta"))
        self.vocab, self.ctx = vocab, ctx

    def forward(self, h: Tensor) -> Tensor:
        return self.ctx.all_gather_last_dim(F.linear(h, self.weight))[..., : self.vocab]


def _shard_linear(full: nn.Module, dim: int, start: int, stop: int) -> nn.Linear:
    """A meta-device Linear holding rows (dim 0) or columns (dim 1) start:stop of `full`."""
    assert isinstance(full, nn.Linear)
    out_f, in_f = (stop - start, full.in_features) if dim == 0 else (full.out_features, stop - start)
    return nn.Linear(in_f, out_f, bias=full.bias is not None, device="meta")


def apply_tensor_parallel(model: CausalLM, ctx: ParallelContext) -> dict[str, Shard]:
    """Turn a meta-device stage model into this rank's TP shard; returns the slice of each tensor.

    Call before loading weights: the returned shards are what `weights.load_stage` reads.
    """
    config, tp, r = model.config, ctx.tp, ctx.tp_rank
    check_tensor_parallel(config, tp)
    shards: dict[str, Shard] = {}
    if tp == 1:
        return shards
    hd = config.head_size
    q_local = config.num_attention_heads // tp
    if config.kv_heads % tp == 0:
        kv_local, kv_first = config.kv_heads // tp, r * (config.kv_heads // tp)
    else:  # fewer KV heads than ranks (MQA): each rank keeps a copy of the one its query heads use
        kv_local, kv_first = 1, r * config.kv_heads // tp
    inner = config.intermediate_size // tp

    def column(parent: nn.Module, name: str, prefix: str, start: int, stop: int) -> None:
        old = getattr(parent, name)
        setattr(parent, name, _shard_linear(old, 0, start, stop))
        shards[f"{prefix}.{name}.weight"] = Shard(0, start, stop)
        if old.bias is not None:
            shards[f"{prefix}.{name}.bias"] = Shard(0, start, stop)

    def row(parent: nn.Module, name: str, prefix: str, start: int, stop: int) -> None:
        old = getattr(parent, name)
        new = _shard_linear(old, 1, start, stop)
        # The one all-reduce after the row-parallel matmul, as in gpt-fast's tp.py.
        new.register_forward_hook(lambda _m, _i, out: ctx.all_reduce(out))
        setattr(parent, name, new)
        shards[f"{prefix}.{name}.weight"] = Shard(1, start, stop)
        if old.bias is not None:
            shards[f"{prefix}.{name}.bias"] = Shard(0, 0, old.out_features, zero=r != 0)

    for index, layer in model.model.layers.items():
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
        column(attn, "q_proj", f"{prefix}.self_attn", r * q_local * hd, (r + 1) * q_local * hd)
        column(attn, "k_proj", f"{prefix}.self_attn", kv_first * hd, (kv_first + kv_local) * hd)
        column(attn, "v_proj", f"{prefix}.self_attn", kv_first * hd, (kv_first + kv_local) * hd)
        row(attn, "o_proj", f"{prefix}.self_attn", r * q_local * hd, (r + 1) * q_local * hd)
        attn.n_heads, attn.n_kv_heads = q_local, kv_local
        column(mlp, "gate_proj", f"{prefix}.mlp", r * inner, (r + 1) * inner)
        column(mlp, "up_proj", f"{prefix}.mlp", r * inner, (r + 1) * inner)
        row(mlp, "down_proj", f"{prefix}.mlp", r * inner, (r + 1) * inner)

    rows = -(-config.vocab_size // tp)  # vocab padded up to a multiple of tp
    vocab_shard = Shard(0, r * rows, (r + 1) * rows)
    if model.model.embed_tokens is not None:
        model.model.embed_tokens = VocabParallelEmbedding(rows, config.hidden_size, r * rows, ctx)
        shards["model.embed_tokens.weight"] = vocab_shard
    if model.lm_head is not None:
        model.lm_head = VocabParallelLMHead(rows, config.hidden_size, config.vocab_size, ctx)
        shards["lm_head.weight"] = vocab_shard
    return shards
