"""ENGINE=deepspeed: the same Engine, with the native decoder swapped for DeepSpeed inference AutoTP.

DeepSpeed shards the transformers model itself (AutoTP: column/row-parallel linears with its own
all-reduce), so only the stage forward changes: `HFStage` runs the AutoTP model with one
transformers KV cache per slot, and everything around it (step plan broadcast, sampling,
heartbeat, worker loop, shutdown) is the native engine's. Limits, all DeepSpeed's: tensor
parallel only (pp must be 1), every rank first loads the whole checkpoint and then keeps its
shard, and the all-reduces inside the model go through deepspeed.comm, not our counted wrappers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from largemodel import modelfacts
from largemodel.envcontract import RankEnv
from largemodel.runtime.model import ModelConfig, load_config
from largemodel.runtime.parallel import ParallelContext, TensorParallelError
from largemodel.runtime.weights import parse_dtype

if TYPE_CHECKING:
    from largemodel.runtime.engine import Engine

log = logging.getLogger(__name__)


class DeepSpeedConfigError(ValueError):
    """The requested layout is one DeepSpeed inference cannot run; the message says what to change."""


class SlotLayout:
    """Which slot and positions each row of a micro-batch uses (HFStage's BatchLayout)."""

    def __init__(self, slots: Tensor, start_pos: Tensor, lengths: Tensor) -> None:
        self.slots, self.start_pos, self.lengths = slots.tolist(), start_pos.tolist(), lengths.tolist()


class HFStage(nn.Module):
    """A whole transformers model behind the stage-model surface the engine drives."""

    def __init__(self, module: nn.Module, config: ModelConfig, max_batch: int, max_len: int) -> None:
        super().__init__()
        self.module, self.config = module, config
        self.hf_config: Any = getattr(module, "config", None)
        self.first = self.last = True
        self.max_batch, self.max_len = max_batch, max_len
        self.caches: list[Any] = [None] * max_batch

    def layout(self, slots: Tensor, start_pos: Tensor, lengths: Tensor, dtype: torch.dtype) -> SlotLayout:
        """Per-row slot and positions; transformers builds its own masks."""
        return SlotLayout(slots, start_pos, lengths)

    def forward(self, x: Tensor, layout: SlotLayout) -> Tensor:
        """Logits [B, vocab] of each row's last new token, one transformers forward per row."""
        from transformers import DynamicCache

        rows = []
        for row, (slot, start, length) in enumerate(zip(layout.slots, layout.start_pos, layout.lengths, strict=True)):
            cache = self.caches[slot]
            if start == 0 or cache is None:
                cache = self.caches[slot] = DynamicCache(config=self.hf_config)
            elif cache.get_seq_length() > start:
                cache.crop(start)  # the scheduler re-sent positions: forget what follows them
            elif cache.get_seq_length() < start:
                raise ValueError(f"slot {slot}: start_pos {start} skips positions after {cache.get_seq_length()}")
            positions = torch.arange(start, start + length, device=x.device)[None]
            out = self.module(input_ids=x[row:row + 1, :length], past_key_values=cache, use_cache=True,
                              position_ids=positions, cache_position=positions[0])
            rows.append(out.logits[0, -1])
        return torch.stack(rows).float()


def load_autotp(model_dir: Path, ctx: ParallelContext, dtype: torch.dtype, max_batch: int, max_len: int) -> HFStage:
    """Load the transformers model and let DeepSpeed shard it over this stage's TP ranks."""
    config = load_config(model_dir)
    # The same rules the planner applies (largemodel.modelfacts), so an admitted layout gets here intact.
    problem = modelfacts.pipeline_problem(layers=config.num_hidden_layers, pp=ctx.pp, engine="deepspeed")
    if problem:
        raise DeepSpeedConfigError(f"{problem}: set pipeline to 1 or use ENGINE=native for pipeline parallelism")
    problem = modelfacts.tensor_problem(heads=config.num_attention_heads, kv_heads=config.kv_heads,
                                        intermediate=config.intermediate_size, tp=ctx.tp, engine="deepspeed")
    if problem:
        raise TensorParallelError(f"DeepSpeed AutoTP: {problem}; ENGINE=native replicates KV heads instead")
    import deepspeed
    from transformers import AutoModelForCausalLM

    if ctx.device.type == "cpu":
        # DeepSpeed's shared-memory all-reduce segfaults on CPU; gloo through torch.distributed works.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=ctx.backend)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": ctx.tp}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    module = engine.module.to(ctx.device)
    log.info("event=deepspeed_autotp_ready rank=%d tp=%d dtype=%s", ctx.rank, ctx.tp, dtype)
    return HFStage(module, config, max_batch, max_len)


def start_deepspeed(model_dir: Path, ctx: ParallelContext, env: RankEnv, max_batch: int, max_len: int,
                    on_loaded: Callable[[], None], on_fatal: Callable[[BaseException], None] | None) -> Engine | None:
    """Global rank 0 gets the Engine over the AutoTP model; other ranks work until SHUTDOWN (returns None).

    The same Engine class as ENGINE=native, so the scheduler drives it through the same submit/result.
    """
    from largemodel.runtime.engine import Engine, worker_loop
    from largemodel.runtime.omp import on_own_thread

    # as start_native: no OpenMP team may outlive the load next to the engine thread's (runtime/omp.py)
    stage = on_own_thread(lambda: load_autotp(model_dir, ctx, parse_dtype(env.model_dtype), max_batch, max_len),
                          "load-shard")
    on_loaded()
    if ctx.rank != 0:
        worker_loop(stage, ctx)
        return None
    return Engine(stage, ctx, micro_batches=env.micro_batches, on_fatal=on_fatal)
