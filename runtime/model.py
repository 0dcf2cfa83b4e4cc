"""Llama-family decoder in plain PyTorch modules, with a paged KV cache.

Covers Llama 2/3, Mistral, Qwen2 and SmolLM: RMSNorm, RoPE (default, linear and llama3
scaling), grouped-query attention, SwiGLU, tied or untied embeddings, optional q/k/v bias.
Parameter names equal the Hugging Face checkpoint names, so a stage's state dict *is* the list
of checkpoint tensors it must read. A model holds only the layers of one pipeline stage.

Each module has one forward path in plain torch ops (gpt-fast style). What makes it fast or
distributed is applied afterwards, as transformations of the meta-device model: tensor parallelism
(`largemodel.runtime.parallel.apply_tensor_parallel`), then fused q/k/v and gate/up projections and
the CPU decode kernels (`largemodel.runtime.transforms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from largemodel.modelfacts import (
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    ModelConfig,
    ModelConfigError,
    load_config,
)

# The config reader and its rules live in largemodel.modelfacts (shared with the planner).
__all__ = ["SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "ModelConfig", "ModelConfigError", "load_config"]


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies exactly as transformers computes them (default, linear, llama3)."""
    rope = config.rope
    dim = config.head_size
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    kind = rope["rope_type"]
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


# Tokens per KV-cache block: the unit of allocation and of prefix reuse (runtime/kvblocks.py).
BLOCK_SIZE = 16


@dataclass
class BatchLayout:
    """Where the tokens of one micro-batch sit: computed once, shared by every layer.

    Inputs are padded to [B, T]; row b holds `lengths[b]` real tokens at positions
    start_pos[b] .. start_pos[b]+lengths[b]-1 of its sequence. The KV cache is paged: position p of
    row b lives at cache index `blocks[b, p // block_size] * block_size + p % block_size`
    (`index[b, p]`), so rows may share the blocks of a common prefix.
    """

    index: Tensor  # [B, kv_len] cache index of each row's positions 0..kv_len-1
    span: slice | None  # index as one contiguous range (one row): cache reads become views
    valid: Tensor | None  # [B, T] real-token mask; None when no row is padded
    write_index: Tensor  # [N] cache index of each real token
    write_pos: Tensor  # [N] position of each real token
    kv_len: int
    mask: Tensor | None  # [B, 1, T, kv_len] keys each query may see; None for one decode token or `causal`
    causal: bool  # every row is a whole prompt from position 0, unpadded: attention is plain causal
    cos: Tensor  # [B, T, 1, head_dim]
    sin: Tensor
    last: Tensor  # [B] index of each row's last real token


def make_layout(cos_table: Tensor, sin_table: Tensor, blocks: Tensor, start_pos: Tensor, lengths: Tensor,
                block_size: int, dtype: torch.dtype) -> BatchLayout:
    """Positions, cache indices, attention mask and RoPE angles of one micro-batch.

    `blocks` [B, nb]: the cache blocks of each row's positions 0 .. nb * block_size - 1 (a block
    table row, covering at least start_pos + length positions).
    """
    batch, width = int(blocks.shape[0]), int(lengths.max())
    offsets = torch.arange(width, device=blocks.device)
    positions = start_pos[:, None] + offsets[None, :]
    padded = bool((lengths != width).any())
    valid = offsets[None, :] < lengths[:, None] if padded else None
    kv_len = int((start_pos + lengths).max())
    if kv_len > blocks.shape[1] * block_size:
        raise ValueError(f"block table of {blocks.shape[1]} blocks cannot hold {kv_len} positions")
    keys = torch.arange(kv_len, device=blocks.device)
    index = blocks[:, keys // block_size] * block_size + keys % block_size
    clamped_pos = positions.clamp(max=kv_len - 1)  # padding may run past the table
    if valid is None:
        write_index, write_pos = index.gather(1, positions).reshape(-1), positions.reshape(-1)
    else:
        write_index, write_pos = index.gather(1, clamped_pos)[valid], positions[valid]
    # Whole unpadded prompts from position 0 need no mask: SDPA's causal mode skips the keys above the
    # diagonal instead of masking them (about half of a long prefill's attention work).
    causal = width > 1 and valid is None and not bool(start_pos.any())
    mask = None
    if not (batch == 1 and width == 1) and not causal:
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
    span = None
    if batch == 1:
        first = int(index[0, 0])
        if bool((index[0] == torch.arange(first, first + kv_len, device=index.device)).all()):
            span = slice(first, first + kv_len)
    clamped = positions.clamp(max=cos_table.shape[0] - 1)
    return BatchLayout(
        index=index, span=span, valid=valid, write_index=write_index, write_pos=write_pos, kv_len=kv_len,
        mask=mask, causal=causal, cos=cos_table[clamped].to(dtype)[:, :, None, :], sin=sin_table[clamped].to(dtype)[:, :, None, :],
        last=lengths - 1,
    )


def rotate_half(x: Tensor) -> Tensor:
    """The rotate-half RoPE form Llama checkpoints are trained with."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, layout: BatchLayout) -> Tensor:
    """RoPE of heads x [B, T, heads, head_dim] at the layout's positions."""
    return x * layout.cos + rotate_half(x) * layout.sin


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over a paged KV cache ([kv_heads, blocks * block_size, head_dim] per layer)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.head_size
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.o_bias)
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def setup_cache(self, cache_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate this layer's cache of `cache_len` token positions (blocks x block size) once;
        nothing is allocated per step after this."""
        shape = (self.n_kv_heads, cache_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), layout)
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), layout)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        return self.o_proj(self.attend(q, k, v, layout))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: BatchLayout) -> Tensor:
        """Write the real tokens' k/v [B, T, KV, D] into the cache and attend q [B, T, H, D] over each
        row's cached keys; returns [B, T, H * D]."""
        assert self.k_cache is not None and self.v_cache is not None, "setup_cache() first"
        batch, width = q.shape[:2]
        new_k = k.flatten(0, 1) if layout.valid is None else k[layout.valid]
        new_v = v.flatten(0, 1) if layout.valid is None else v[layout.valid]
        self.k_cache[:, layout.write_index] = new_k.transpose(0, 1)
        self.v_cache[:, layout.write_index] = new_v.transpose(0, 1)
        if layout.span is not None:
            keys, values = self.k_cache[None, :, layout.span], self.v_cache[None, :, layout.span]
        else:  # gather each row's positions: [KV, B, kv_len, D] -> [B, KV, kv_len, D]
            keys = self.k_cache[:, layout.index].transpose(0, 1)
            values = self.v_cache[:, layout.index].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=layout.mask, is_causal=layout.causal,
            scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return out.transpose(1, 2).reshape(batch, width, self.n_heads * self.head_dim)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), layout)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """The layers of one pipeline stage, plus the embedding (first stage) and final norm (last)."""

    def __init__(self, config: ModelConfig, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens: nn.Module | None = nn.Embedding(config.vocab_size, config.hidden_size) if first else None
        # Keys are global layer indices so parameter names match the checkpoint's.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None


class CausalLM(nn.Module):
    """One pipeline stage of a Llama-family causal LM; parameter names match the checkpoint."""

    def __init__(self, config: ModelConfig, layers: range, first: bool = True, last: bool = True) -> None:
        super().__init__()
        self.config, self.first, self.last = config, first, last
        self.model = Decoder(config, layers, first, last)
        self.lm_head: nn.Module | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if last else None
        self.cos_table = torch.empty(0)
        self.sin_table = torch.empty(0)
        self.max_batch = self.max_len = 0
        self.block_size, self.blocks_per_seq, self.num_blocks = BLOCK_SIZE, 0, 0

    def setup_caches(self, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                     num_blocks: int = 0, block_size: int = BLOCK_SIZE) -> None:
        """Allocate every layer's paged KV cache and the RoPE tables for positions < max_len.

        `num_blocks` blocks of `block_size` positions each; at least (and by default) enough for
        `max_batch` sequences of `max_len` tokens each, so a running sequence never waits for a block.
        Blocks beyond that keep more cached prefixes.
        """
        self.max_batch, self.max_len, self.block_size = max_batch, max_len, block_size
        self.blocks_per_seq = -(-max_len // block_size)
        needed = max_batch * self.blocks_per_seq
        if num_blocks and num_blocks < needed:
            raise ValueError(f"{num_blocks} KV-cache blocks cannot hold {max_batch} sequences of {max_len} tokens "
                             f"({needed} blocks of {block_size})")
        self.num_blocks = max(num_blocks, needed)
        for layer in self.model.layers.values():
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.setup_cache(self.num_blocks * block_size, dtype, device)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(self.config))
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos_table, self.sin_table = angles.cos().to(device), angles.sin().to(device)

    def layout(self, slots: Tensor, start_pos: Tensor, lengths: Tensor, dtype: torch.dtype,
               blocks: Tensor | None = None) -> BatchLayout:
        """The BatchLayout of a micro-batch for this stage's caches.

        `blocks`: each row's block table (the engine's, runtime/kvblocks.py); without one, slot s owns
        blocks s * blocks_per_seq onwards (a static cache of max_batch x max_len).
        """
        if blocks is None:
            count = -(-int((start_pos + lengths).max()) // self.block_size)
            blocks = slots[:, None] * self.blocks_per_seq + torch.arange(count, device=slots.device)
        if blocks.numel() and not 0 <= int(blocks.min()) <= int(blocks.max()) < self.num_blocks:
            raise ValueError(f"block ids {int(blocks.min())}..{int(blocks.max())} outside 0..{self.num_blocks - 1}")
        return make_layout(self.cos_table, self.sin_table, blocks, start_pos, lengths, self.block_size, dtype)

    def run_layers(self, h: Tensor, layout: BatchLayout) -> Tensor:
        """This stage's decoder layers over hidden states [B, T, D]."""
        for layer in self.model.layers.values():
            h = layer(h, layout)
        return h

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        """Token ids [B, T] (first stage) or hidden states [B, T, D] in; hidden states out.

        The last stage returns logits [B, vocab] of each row's last real token instead.
        """
        h = self.model.embed_tokens(x) if self.model.embed_tokens is not None else x
        h = self.run_layers(h, layout)
        if not self.last:
            return h
        assert self.model.norm is not None and self.lm_head is not None
        last = h[torch.arange(h.shape[0], device=h.device), layout.last]
        return self.lm_head(self.model.norm(last)).float()
