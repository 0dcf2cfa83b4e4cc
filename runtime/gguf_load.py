"""quantization=gguf: serve a .gguf file's tensors as they are, reading only this rank's part (issue 19).

The model directory is a GGUF model directory (runtime/modelstore.gguf_model_dir: config.json and the
tokenizer from the file's metadata, `model.gguf` linking to the file). The stage is built as for
safetensors (meta device, tensor parallel, fused q/k/v and gate/up, CPU kernel modules, dtype cast);
then `ggml_kinds` reads the file's tensor table (largemodel.modelfacts.read_gguf_header: the header
only) and every module whose tensor is Q4_1 or Q8_0 becomes a GGML-block module of that kind
(quant.apply_ggml_kinds): the attention/MLP linears GGMLLinear, a quantized token embedding a
GGMLEmbedding, the LM head (the tied token embedding's bytes, or output.weight) a GGMLLinear. F32,
F16 and BF16 tensors (the norms) are read into the model dtype. Other ggml types are refused, named.

`load_gguf_weights` maps the file (numpy memmap) and copies each parameter's slice in: rows
start:stop for column-parallel and vocab shards (zero rows past the vocab), whole blocks of every
row for row-parallel ones (the planner and empty_stage reject a tp whose slice would cut a block).
llama.cpp stores attn_q/attn_k with each head's rotary halves interleaved (gguf_convert.unpermute
undoes it); the permutation moves whole rows, so a rank reads its heads' rows in Hugging Face order
straight from the file's block rows. Only those pages are touched: a stage reads its own layers, a
TP rank its own slices, and nothing is dequantized at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from largemodel import modelfacts
from largemodel.modelfacts import GGUFHeader, GGUFTensor, ModelConfig, ModelConfigError
from largemodel.runtime.gguf_convert import GGUFConvertError, gguf_name, unpermute
from largemodel.runtime.parallel import Shard, VocabParallelEmbedding, VocabParallelLMHead
from largemodel.runtime.transforms import FusedAttention, FusedMLP, checkpoint_tensors

log = logging.getLogger(__name__)

GGML_KINDS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}  # ggml type -> cpu_kernels GGML block kind served as is
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def type_name(tensor: GGUFTensor) -> str:
    return modelfacts.GGML_TYPES[tensor.ggml_type][0]


@dataclass
class GGUFTensors:
    """A GGUF file's tensor table and its bytes, mapped (nothing is read until a slice is copied)."""

    path: Path
    header: GGUFHeader
    data: np.ndarray  # uint8 memmap of the whole file

    @classmethod
    def open(cls, path: Path) -> GGUFTensors:
        header = modelfacts.read_gguf_header(Path(path))
        return cls(Path(path), header, np.memmap(path, dtype=np.uint8, mode="r"))

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.header.tensors}

    def tensor(self, name: str) -> GGUFTensor:
        if name not in self.by_name:
            raise ModelConfigError(f"{self.path} has no tensor {name!r}")
        return self.by_name[name]

    def rows(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as [rows, bytes per row] (a 1-D tensor is one row)."""
        _, block, size = modelfacts.GGML_TYPES[tensor.ggml_type]
        width = tensor.shape[0] // block * size
        begin = self.header.data_offset + tensor.offset
        if begin + tensor.nbytes > self.data.shape[0]:
            raise ModelConfigError(f"{self.path} ends inside tensor {tensor.name}: an incomplete copy or download")
        return self.data[begin:begin + tensor.nbytes].reshape(-1, width)


def source_tensor(name: str, config: ModelConfig, names: set[str]) -> str:
    """The GGUF tensor holding checkpoint tensor `name` (a tied LM head is the token embedding)."""
    if name == "lm_head.weight" and "output.weight" not in names and config.tie_word_embeddings:
        return "token_embd.weight"
    try:
        return gguf_name(name)
    except GGUFConvertError as err:
        raise ModelConfigError(str(err)) from None


def module_sources(model: nn.Module) -> dict[str, list[str]]:
    """Each module with a `weight` that may be quantized -> the checkpoint names of its weight's row blocks."""
    sources: dict[str, list[str]] = {}
    fused: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (FusedAttention, FusedMLP)):
            for fused_name, parts in module.parts.items():
                sources[f"{prefix}.{fused_name}"] = [f"{prefix}.{part}.weight" for part, _ in parts]
                fused.add(f"{prefix}.{fused_name}")
    for prefix, module in model.named_modules():
        if prefix not in fused and isinstance(module, (nn.Linear, nn.Embedding, VocabParallelEmbedding,
                                                       VocabParallelLMHead)):
            sources[prefix] = [f"{prefix}.weight"]
    return sources


def ggml_kinds(model: nn.Module, config: ModelConfig, tensors: GGUFTensors) -> dict[str, str]:
    """Module name -> GGML block kind of every module whose tensor(s) the file holds in Q4_1 or Q8_0.

    A fused projection (q/k/v, gate/up) is one matrix: its parts must share one type. ModelConfigError
    names a tensor of a type this runtime does not serve."""
    names = set(tensors.by_name)
    kinds: dict[str, str] = {}
    for module, parts in module_sources(model).items():
        sources = {source_tensor(part, config, names): type_name(tensors.tensor(source_tensor(part, config, names)))
                   for part in parts}
        types = set(sources.values())
        for source, kind in sources.items():
            if kind not in GGML_KINDS and kind not in FLOAT_TYPES:
                raise ModelConfigError(
                    f"{tensors.path}: {source} is {kind}; quantization=gguf serves "
                    f"{', '.join(GGML_KINDS)} and {', '.join(FLOAT_TYPES)} tensors as they are (requantize the file, "
                    "e.g. llama-quantize --allow-requantize ... Q4_1)")
        if len(types) > 1:
            raise ModelConfigError(f"{tensors.path}: {module}'s parts {', '.join(parts)} are of different types "
                                   f"({', '.join(sorted(types))}); a fused projection needs one type")
        kind = types.pop()
        if kind in GGML_KINDS:
            kinds[module] = GGML_KINDS[kind]
    return kinds


def rope_rows(name: str, config: ModelConfig) -> np.ndarray | None:
    """For q/k: GGUF row of each Hugging Face row (llama.cpp's rope permutation), else None."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = config.num_attention_heads
    elif name.endswith("self_attn.k_proj.weight"):
        heads = config.kv_heads
    else:
        return None
    rows = heads * config.head_size
    return np.asarray(unpermute(np.arange(rows)[:, None], heads)[:, 0])


def read_slice(tensors: GGUFTensors, tensor: GGUFTensor, shard: Shard | None, order: np.ndarray | None) -> np.ndarray:
    """The bytes of `shard` of `tensor` as [rows, bytes], rows in Hugging Face order (`order`), zero rows
    past the tensor's rows (vocab padding)."""
    data = tensors.rows(tensor)
    count = data.shape[0]
    if shard is None:
        return np.array(data if order is None else data[order])
    _, block, size = modelfacts.GGML_TYPES[tensor.ggml_type]
    if shard.dim == 1:
        if shard.start % block or shard.stop % block:
            raise ModelConfigError(f"{tensor.name}: columns {shard.start}:{shard.stop} cut a block of {block} "
                                   "weights (a tensor size the planner rejects)")
        part = data[:, shard.start // block * size:shard.stop // block * size]
        return np.array(part if order is None else part[order])
    stop = min(shard.stop, count)
    index = np.arange(shard.start, stop) if order is None else order[shard.start:stop]
    part = np.array(data[shard.start:stop] if order is None else data[index])
    if shard.stop > max(stop, shard.start):
        pad = np.zeros((shard.stop - max(stop, shard.start), data.shape[1]), dtype=np.uint8)
        part = np.concatenate([part, pad])
    return part


def load_gguf_weights(model: nn.Module, config: ModelConfig, tensors: GGUFTensors, shards: dict[str, Shard]) -> int:
    """Copy every parameter's slice in from the GGUF file (see the module docstring); returns the bytes."""
    names = set(tensors.by_name)
    total = 0
    with torch.no_grad():
        for name, param in checkpoint_tensors(model):
            shard = shards.get(name)
            total += param.numel() * param.element_size()
            if shard is not None and shard.zero:  # a row-parallel bias (GGUF llama files have none)
                param.zero_()
                continue
            tensor = tensors.tensor(source_tensor(name, config, names))
            kind = type_name(tensor)
            raw = torch.from_numpy(read_slice(tensors, tensor, shard, rope_rows(name, config)))
            if param.dtype == torch.uint8:
                part = raw
            elif kind in FLOAT_TYPES:
                part = raw.view(FLOAT_TYPES[kind]).to(param.dtype)
                part = part.reshape(-1) if param.dim() == 1 else part
            else:
                raise ModelConfigError(f"{tensor.name} is {kind} but {name} is held in {param.dtype}")
            if tuple(part.shape) != tuple(param.shape):
                raise ModelConfigError(f"{tensors.path}: {tensor.name} ({kind}, ggml shape {list(tensor.shape)}) "
                                       f"gives {tuple(part.shape)} for {name}, expected {tuple(param.shape)}")
            param.copy_(part)
    return total
