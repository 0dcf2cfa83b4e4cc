"""Weight-only int8 quantization of a stage's projections (issue 19, `MODEL_QUANTIZATION=int8`).

A decode step reads every weight once, so its speed is the bytes of weights per token. `int8` keeps
each linear weight of attention and MLP (q/k/v/o, gate/up/down, and the fused qkv_proj and
gate_up_proj) as int8 [out, in] with one fp32 scale per output row (symmetric: scale = absmax / 127,
so w ~= q * scale); embeddings, the LM head, norms and biases stay in the model dtype.

`quantize_int8` runs on the meta model after tensor parallelism, fusion and the kernel swap, and
after the cast to the model dtype (so nothing casts the fp32 scales): every such Linear becomes an
`Int8Linear` in place (its class changed, as transforms.py does, so TP's all-reduce hooks stay) with
an int8 `weight` and an fp32 `weight_scale` parameter. Loading (weights.load_weights) reads each
rank's slice of the checkpoint tensor as before and quantizes it per row with `quantize_rows`, or
reads `<name>.weight` (I8) and `<name>.weight_scale` when the checkpoint is already quantized.

Forward: up to `cpu_kernels.INT8_MAX_ROWS` activation rows on CPU, the `int8_linear` kernel (the
int8 row widened in registers, fp32 FMAs, the scale applied once per output); beyond that, or off
CPU, the weight is dequantized in row chunks to the activation dtype and multiplied by torch
(`cpu_kernels.int8_linear`'s fallback).

GGML blocks (`q4`, `gguf`): a `GGMLLinear` holds its weight as the uint8 GGML blocks of cpu_kernels
("GGML block formats": [out, in / 32 * block bytes], each row its blocks along `in`, as a GGUF file
stores them) and the block `kind` ("q4_1" or "q8_0"); forward is cpu_kernels.ggml_linear. `q4`
makes every attention/MLP Linear Q4_1, filled at load by quantizing each rank's slice of the
safetensors tensor (cpu_kernels.ggml_quantize, byte-exact with ggml; the slices of a row-parallel
split start on block boundaries, so a rank's blocks are those of the whole tensor). `gguf` serves a
.gguf file's tensors as they are (weights.load_gguf_weights): its Q4_1 and Q8_0 linears become
GGMLLinear of their own kind, and a quantized token embedding becomes a `GGMLEmbedding` (only the
looked-up rows are dequantized) with, when tied, an LM head that is a GGMLLinear over the same bytes.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from largemodel import envcontract
from largemodel.runtime import cpu_kernels
from largemodel.runtime.model import MLP, Attention
from largemodel.runtime.parallel import VocabParallelEmbedding, VocabParallelLMHead

log = logging.getLogger(__name__)

QUANTIZATION_ENV = envcontract.MODEL_QUANTIZATION
QUANTIZATIONS = envcontract.QUANTIZATIONS
SUPPORTED = ("none", "int8", "q4", "gguf")  # what this runtime serves (all of envcontract.QUANTIZATIONS)
Q4_KIND = "q4_1"  # quantization=q4's block format


def quantization_from_env() -> str:
    """MODEL_QUANTIZATION of this process ("none" when unset or empty), checked against what we serve
    (benches and tests; ranks read it through envcontract.RankEnv)."""
    value = (os.environ.get(QUANTIZATION_ENV, "") or "none").strip().lower()
    return check_quantization(value)


def check_quantization(value: str) -> str:
    """`value` if this runtime serves it; ValueError naming the accepted values otherwise."""
    if value not in QUANTIZATIONS:
        raise ValueError(f"{QUANTIZATION_ENV}={value!r} is not one of {', '.join(QUANTIZATIONS)}")
    if value not in SUPPORTED:
        raise ValueError(f"{QUANTIZATION_ENV}={value} is not served by this runtime yet (it serves "
                         f"{', '.join(SUPPORTED)})")
    return value


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of a [out, in] matrix: (q int8, scale fp32 [out]), weight ~= q * scale[:, None].

    scale = absmax / 127 per row (0 for an all-zero row, whose q is then 0); q = round(w / scale).
    """
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """q * scale[:, None] in fp32: the exact value of what an Int8Linear holds."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


class Int8Linear(nn.Linear):
    """nn.Linear with an int8 weight [out, in] and an fp32 `weight_scale` [out]; bias in the model dtype."""

    weight_scale: nn.Parameter

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's signature
        return cpu_kernels.int8_linear(input, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 per-channel"


def _to_int8(linear: nn.Linear) -> None:
    device = linear.weight.device
    linear.weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=torch.int8, device=device),
                                 requires_grad=False)
    linear.weight_scale = nn.Parameter(torch.empty(linear.out_features, dtype=torch.float32, device=device),
                                       requires_grad=False)
    linear.__class__ = Int8Linear


def quantize_int8(model: nn.Module) -> int:
    """Make every Linear of every Attention and MLP an Int8Linear (meta model, after the dtype cast and
    before allocation; loading fills them). Returns how many were converted."""
    converted = 0
    for module in list(model.modules()):
        if not isinstance(module, (Attention, MLP)):
            continue
        for child in module.children():
            if isinstance(child, nn.Linear) and not isinstance(child, Int8Linear):
                _to_int8(child)
                converted += 1
    log.debug("event=quantized kind=int8 linears=%d", converted)
    return converted


class GGMLLinear(nn.Linear):
    """nn.Linear whose weight is uint8 GGML blocks [out, in / 32 * block bytes] of `kind` (q4_1, q8_0)."""

    kind: str

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's signature
        return cpu_kernels.ggml_linear(input, self.weight, self.kind, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml {self.kind}"


def ggml_embedding(ids: Tensor, weight: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """Rows `ids` of a GGML-block embedding table, dequantized (only those rows) to `dtype`: [*ids.shape, dim]."""
    rows = cpu_kernels.ggml_dequantize(weight[ids.reshape(-1)], kind)
    return rows.to(dtype).reshape(*ids.shape, rows.shape[-1])


class GGMLEmbedding(nn.Embedding):
    """nn.Embedding over GGML blocks: a lookup dequantizes the looked-up rows to `out_dtype`."""

    kind: str
    out_dtype: torch.dtype

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's signature
        return ggml_embedding(input, self.weight, self.kind, self.out_dtype)


class GGMLVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding over GGML blocks (this rank's vocab rows)."""

    kind: str
    out_dtype: torch.dtype

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = ggml_embedding(local.masked_fill(outside, 0), self.weight, self.kind, self.out_dtype)
        return self.ctx.all_reduce(out.masked_fill(outside[..., None], 0.0))


class GGMLVocabParallelLMHead(VocabParallelLMHead):
    """VocabParallelLMHead over GGML blocks (this rank's vocab rows; padding rows are zero blocks)."""

    kind: str

    def forward(self, h: Tensor) -> Tensor:
        return self.ctx.all_gather_last_dim(cpu_kernels.ggml_linear(h, self.weight, self.kind))[..., : self.vocab]


def ggml_shape(rows: int, cols: int, kind: str) -> tuple[int, int]:
    """The uint8 [rows, blocks * block bytes] a [rows, cols] weight takes in `kind` (cols whole blocks)."""
    if kind not in cpu_kernels.GGML_BLOCK_BYTES:
        raise ValueError(f"GGML block kind {kind!r} is not served (only {', '.join(cpu_kernels.GGML_BLOCK_BYTES)})")
    if cols % cpu_kernels.GGML_BLOCK:
        raise ValueError(f"a {kind} weight needs rows of whole {cpu_kernels.GGML_BLOCK}-weight blocks; "
                         f"this one has {cols} weights per row")
    return rows, cols // cpu_kernels.GGML_BLOCK * cpu_kernels.GGML_BLOCK_BYTES[kind]


def to_ggml(module: nn.Module, kind: str, dtype: torch.dtype = torch.float32) -> None:
    """Make one Linear, Embedding or vocab-parallel embedding/LM head hold `kind` GGML blocks (meta
    device, before allocation; loading fills them). `dtype`: what a GGML embedding's lookups return."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    rows, cols = weight.shape
    module.weight = nn.Parameter(torch.empty(ggml_shape(rows, cols, kind), dtype=torch.uint8, device=weight.device),
                                 requires_grad=False)
    if isinstance(module, VocabParallelEmbedding):
        module.__class__ = GGMLVocabParallelEmbedding
    elif isinstance(module, VocabParallelLMHead):
        module.__class__ = GGMLVocabParallelLMHead
    elif isinstance(module, nn.Embedding):
        module.__class__ = GGMLEmbedding
    elif isinstance(module, nn.Linear):
        module.__class__ = GGMLLinear
    else:
        raise TypeError(f"{type(module).__name__} has no GGML-block form")
    module.kind = kind
    module.out_dtype = dtype


def quantize_q4(model: nn.Module) -> int:
    """Make every Linear of every Attention and MLP a Q4_1 GGMLLinear (meta model, after the dtype cast);
    loading quantizes each rank's slice into it. Returns how many were converted."""
    converted = 0
    for module in list(model.modules()):
        if not isinstance(module, (Attention, MLP)):
            continue
        for child in module.children():
            if isinstance(child, nn.Linear) and not isinstance(child, (Int8Linear, GGMLLinear)):
                to_ggml(child, Q4_KIND)
                converted += 1
    log.debug("event=quantized kind=q4 linears=%d", converted)
    return converted


def apply_ggml_kinds(model: nn.Module, kinds: dict[str, str], dtype: torch.dtype) -> int:
    """quantization=gguf: make each named module (model.named_modules() names) hold its kind's GGML
    blocks, as the file stores that tensor; modules not named stay in the model dtype. Returns how many."""
    modules = dict(model.named_modules())
    for name, kind in kinds.items():
        to_ggml(modules[name], kind, dtype)
    log.debug("event=quantized kind=gguf modules=%d", len(kinds))
    return len(kinds)


def apply_quantization(model: nn.Module, quantization: str) -> int:
    """The transform for one MODEL_QUANTIZATION value (none: nothing; gguf: weights.empty_stage applies the
    file's own kinds with apply_ggml_kinds); returns the modules converted."""
    check_quantization(quantization)
    if quantization == "int8":
        return quantize_int8(model)
    if quantization == "q4":
        return quantize_q4(model)
    return 0


def dequantize_int8(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Turn every Int8Linear back into a float Linear holding q * scale in `dtype` (the exact reference
    for what the quantized model computes); returns how many. The class becomes the kernel-backed
    cpu_kernels.Linear on CPU, nn.Linear elsewhere."""
    count = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            weight = dequantize_rows(module.weight, module.weight_scale).to(dtype)
            del module.weight_scale
            module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            module.__class__ = cpu_kernels.Linear if weight.device.type == "cpu" else nn.Linear  # type: ignore[assignment]
            count += 1
    return count
