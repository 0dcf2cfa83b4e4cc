"""Transformations of a stage model after tensor parallelism: fused projections and the CPU kernels.

`model.py` is the plain model, one forward path per module. `build_stage` cuts it with
`apply_tensor_parallel`, then, still on the meta device, calls:

- `fuse_projections`: each layer's q/k/v become one Linear (`qkv_proj`) and gate/up one
  (`gate_up_proj`). A decode step streams each weight once; one long matrix streams faster than
  three short ones (fewer thread hand-offs, one prefetch ramp). `checkpoint_tensors` names each
  row block of a fused weight by its checkpoint tensor, so loading reads every tensor straight into
  its block, with no copy and no concatenation.
- `apply_cpu_kernels`: modules become their kernel-backed subclasses (`cpu_kernels`: small_linear
  and oneDNN matmuls, fused RMSNorm, residual add + RMSNorm, SwiGLU and one-token decode attention).
  They decide per call, as `cpu_kernels` does, whether a kernel runs (kernels loaded, CPU tensor,
  fp32/bf16, inference) or torch's op; without kernels they compute what the plain modules do.

Both change a module's class in place to a subclass of it (what torch.nn.utils.parametrize does):
parameters, caches and TP's all-reduce hooks stay where they are, and isinstance still holds.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from largemodel.runtime import cpu_kernels
from largemodel.runtime.model import MLP, Attention, BatchLayout, CausalLM, DecoderLayer, RMSNorm, rotate_half
from largemodel.runtime.parallel import VocabParallelLMHead
from largemodel.runtime.quant import GGMLLinear, Int8Linear

log = logging.getLogger(__name__)


def merge_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose weight (and bias) stacks those of `linears` (same input) as row blocks, in order.

    On the meta device this allocates nothing; on a real one it copies the values in.
    """
    first = linears[0]
    merged = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None,
                       device="meta")
    with torch.no_grad():
        merged.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        if first.bias is not None:
            merged.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return merged


class FusedAttention(Attention):
    """Attention with q/k/v as one matmul (`qkv_proj`: q rows, then k, then v)."""

    qkv_proj: nn.Linear
    parts: dict[str, list[tuple[str, int]]]  # fused Linear -> (checkpoint module, rows) of its blocks

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        qkv = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))
        # q and k heads are adjacent in the fused output: one RoPE over both.
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        q, k = (qk * layout.cos + rotate_half(qk) * layout.sin).split([self.n_heads, self.n_kv_heads], dim=2)
        return self.o_proj(self.attend(q, k, v, layout))


class FusedMLP(MLP):
    """SwiGLU with gate/up as one matmul (`gate_up_proj`: gate rows, then up)."""

    gate_up_proj: nn.Linear
    parts: dict[str, list[tuple[str, int]]]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _fuse(module: nn.Module, names: list[str], fused_name: str, cls: type[FusedAttention | FusedMLP]) -> None:
    linears = [getattr(module, name) for name in names]
    setattr(module, fused_name, merge_linears(linears))
    for name in names:
        delattr(module, name)
    module.__class__ = cls
    assert isinstance(module, cls)
    module.parts = {fused_name: [(name, lin.out_features) for name, lin in zip(names, linears, strict=True)]}


def fuse_attention(attn: Attention) -> None:
    """q/k/v of one Attention as one Linear (see merge_linears); the module becomes a FusedAttention."""
    assert type(attn) is Attention, f"not a plain Attention: {type(attn).__name__}"
    _fuse(attn, ["q_proj", "k_proj", "v_proj"], "qkv_proj", FusedAttention)


def fuse_mlp(mlp: MLP) -> None:
    """gate/up of one MLP as one Linear; the module becomes a FusedMLP."""
    assert type(mlp) is MLP, f"not a plain MLP: {type(mlp).__name__}"
    _fuse(mlp, ["gate_proj", "up_proj"], "gate_up_proj", FusedMLP)


def fuse_projections(model: nn.Module) -> None:
    """Fuse every layer's q/k/v and gate/up; after apply_tensor_parallel, before allocating and loading."""
    for module in list(model.modules()):
        if type(module) is Attention:
            fuse_attention(module)
        elif type(module) is MLP:
            fuse_mlp(module)


def checkpoint_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every tensor loading fills, named as in the checkpoint: a parameter, or a row block of a fused one
    (a view of its memory, so reading into it fills the fused parameter in place)."""
    fused: dict[str, list[tuple[str, int]]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (FusedAttention, FusedMLP)):
            fused.update({f"{prefix}.{name}": parts for name, parts in module.parts.items()})
    tensors: list[tuple[str, Tensor]] = []
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner not in fused:
            tensors.append((name, param))
            continue
        parent, start = owner.rpartition(".")[0], 0
        for part, rows in fused[owner]:
            tensors.append((f"{parent}.{part}.{leaf}", param.detach()[start:start + rows]))
            start += rows
    return tensors


class KernelRMSNorm(RMSNorm):
    """RMSNorm through cpu_kernels.rms_norm (one fused pass on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return cpu_kernels.rms_norm(x, self.weight, self.eps)


class KernelAttention(FusedAttention):
    """FusedAttention whose one-token decode runs RoPE, cache write and attention in one CPU kernel call."""

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        batch, width, _ = x.shape
        if width == 1 and layout.valid is None and cpu_kernels.decode_attention_ready(x):
            assert self.k_cache is not None and self.v_cache is not None, "setup_cache() first"
            out = cpu_kernels.decode_attention(self.qkv_proj(x).view(batch, -1), layout.cos, layout.sin,
                                               self.k_cache, self.v_cache, layout.index, layout.write_pos,
                                               self.n_heads, self.n_kv_heads, self.head_dim**-0.5)
            return self.o_proj(out.view(batch, 1, -1))
        return super().forward(x, layout)


class KernelMLP(FusedMLP):
    """FusedMLP with silu(gate) * up in one CPU kernel pass."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(cpu_kernels.silu_mul(self.gate_up_proj(x)))


class KernelDecoderLayer(DecoderLayer):
    """DecoderLayer with the residual add and the post-attention norm in one CPU kernel pass."""

    def forward(self, x: Tensor, layout: BatchLayout) -> Tensor:
        norm = self.post_attention_layernorm
        assert isinstance(norm, RMSNorm)
        h, normed = cpu_kernels.add_rms_norm(x, self.self_attn(self.input_layernorm(x), layout), norm.weight,
                                             norm.eps)
        return h + self.mlp(normed)


class KernelVocabParallelLMHead(VocabParallelLMHead):
    """VocabParallelLMHead whose matmul goes through cpu_kernels.linear."""

    def forward(self, h: Tensor) -> Tensor:
        return self.ctx.all_gather_last_dim(cpu_kernels.linear(h, self.weight))[..., : self.vocab]


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


_NONE = torch.empty(0)  # decode_layers' "no scale" / "no bias"


def _linear_params(linear: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """(weight, scale, bias) of a kernel-backed, int8 or GGML Linear for decode_layers; None for any other."""
    params = linear._parameters
    weight, bias = params["weight"], params.get("bias")
    if type(linear) is Int8Linear:
        scale: Tensor | None = params["weight_scale"]
    elif (type(linear) is cpu_kernels.Linear and weight is not None and weight.dtype == dtype) or (
            type(linear) is GGMLLinear and weight is not None and weight.dtype == torch.uint8):
        scale = _NONE
    else:
        return None
    if weight is None or scale is None or _hooked(linear) or not weight.is_contiguous():
        return None
    return weight, scale, _NONE if bias is None else bias


class KernelCausalLM(CausalLM):
    """CausalLM whose decode steps (one token per row, up to cpu_kernels.MAX_ROWS rows) run all of the
    stage's layers in one cpu_kernels.decode_layers call; anything else goes layer by layer.

    The fused call is the same kernels in the same order (tests/runtime/test_transforms.py checks the
    logits are equal bit for bit), without Python between them. It applies only when every layer is the
    kernel-backed module set with float, int8 or GGML (q4/gguf) weights and no module has hooks: tensor parallelism's
    all-reduces are hooks, so a tp > 1 stage keeps the module path. The tensors are gathered on every
    call (about 0.1 ms for 30 layers), so swapped weights or modules are never served stale.
    """

    def decode_stack(self, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], list[Tensor]] | None:
        """(params, k caches, v caches) for decode_layers, or None when a layer does not qualify."""
        params: list[Tensor] = []
        k_caches: list[Tensor] = []
        v_caches: list[Tensor] = []
        first = None
        for layer in self.model.layers.values():
            mods = layer._modules
            attn, mlp = mods["self_attn"], mods["mlp"]
            norm_in, norm_post = mods["input_layernorm"], mods["post_attention_layernorm"]
            if (type(layer) is not KernelDecoderLayer or type(attn) is not KernelAttention
                    or type(mlp) is not KernelMLP or type(norm_in) is not KernelRMSNorm
                    or type(norm_post) is not KernelRMSNorm):
                return None
            assert attn is not None and mlp is not None and norm_in is not None and norm_post is not None
            if _hooked(layer) or _hooked(attn) or _hooked(mlp) or _hooked(norm_in) or _hooked(norm_post):
                return None
            shape = (attn.n_heads, attn.n_kv_heads, attn.head_dim, norm_in.eps, norm_post.eps)
            first = first or shape
            w_in, w_post = norm_in._parameters["weight"], norm_post._parameters["weight"]
            a, m = attn._modules, mlp._modules
            qkv, o = _linear_params(a["qkv_proj"], dtype), _linear_params(a["o_proj"], dtype)  # type: ignore[arg-type]
            gate_up, down = _linear_params(m["gate_up_proj"], dtype), _linear_params(m["down_proj"], dtype)  # type: ignore[arg-type]
            if (shape != first or first[3] != first[4] or qkv is None or o is None or gate_up is None
                    or down is None or w_in is None or w_post is None or w_in.dtype != dtype
                    or w_post.dtype != dtype or attn.k_cache is None or attn.v_cache is None):
                return None
            params += [w_in, *qkv, *o, w_post, *gate_up, *down]
            k_caches.append(attn.k_cache)
            v_caches.append(attn.v_cache)
        return (params, k_caches, v_caches) if k_caches else None

    def run_layers(self, h: Tensor, layout: BatchLayout) -> Tensor:
        batch = h.shape[0]
        if (h.dim() == 3 and h.shape[1] == 1 and layout.valid is None and batch <= cpu_kernels.MAX_ROWS
                and cpu_kernels.decode_attention_ready(h) and not _global_hooks()):
            stack = self.decode_stack(h.dtype)
            if stack is not None:
                attn = next(iter(self.model.layers.values())).self_attn
                norm = next(iter(self.model.layers.values())).input_layernorm
                assert isinstance(attn, Attention) and isinstance(norm, RMSNorm)
                out = cpu_kernels.decode_layers(h.reshape(batch, -1), *stack, layout.cos, layout.sin, layout.index,
                                                layout.write_pos, attn.n_heads, attn.n_kv_heads,
                                                attn.head_dim**-0.5, norm.eps)
                return out.view(batch, 1, -1)
        return super().run_layers(h, layout)


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


# Exact class -> its kernel-backed subclass (same parameters and state, another forward).
KERNEL_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: cpu_kernels.Linear,
    RMSNorm: KernelRMSNorm,
    FusedAttention: KernelAttention,
    FusedMLP: KernelMLP,
    DecoderLayer: KernelDecoderLayer,
    VocabParallelLMHead: KernelVocabParallelLMHead,
    CausalLM: KernelCausalLM,
}


def apply_cpu_kernels(model: nn.Module) -> int:
    """Swap every module that has a kernel-backed subclass for it (after fuse_projections, so the decode
    attention and SwiGLU kernels see fused outputs); returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        kernel = KERNEL_MODULES.get(type(module))
        if kernel is not None:
            module.__class__ = kernel
            swapped += 1
    log.debug("event=cpu_kernel_modules swapped=%d kernels_loaded=%s", swapped, cpu_kernels.level() is not None)
    return swapped
