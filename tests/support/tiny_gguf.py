"""Tiny seeded GGUF files written with the gguf package's GGUFWriter, laid out as llama.cpp writes Llamas.

Byte-level tokenizer (the 256 byte tokens, no merges), q/k rows in llama.cpp's rope order (the
inverse of gguf_convert.unpermute), F32 norms, Q4_1 linears in GGML's own bytes (cpu_kernels.ggml_quantize
is byte-exact with ggml). Every width is a multiple of 64, so tp=2 row-parallel slices stay on
32-weight blocks. `tied`: Q8_0 token embedding shared with the output, and layer 1's q/k/v and
layer 2's ffn_down in Q8_0 (mixed kinds); `untied`: an F16 token embedding and a Q4_1 output.weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG = dict(vocab=256, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, layers=4, context=128)
VARIANTS = ("tied", "untied")


def _permute(weight: Any, heads: int) -> Any:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (gguf_convert.unpermute undoes it)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, variant: str = "tied", seed: int = 0, kinds: dict[str, str] | None = None) -> Path:
    """Write one tiny Llama GGUF `variant` (see the module docstring) to `path`; `kinds` overrides the type
    of named tensors (f32, f16, q4_1, q8_0, or q4_0: a type the runtime does not serve)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter

    from largemodel.runtime.cpu_kernels import ggml_quantize
    from largemodel.runtime.gguf_convert import _byte_alphabet

    c = CONFIG
    gen = torch.Generator().manual_seed(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(c["context"])
    writer.add_embedding_length(c["hidden"])
    writer.add_block_count(c["layers"])
    writer.add_feed_forward_length(c["intermediate"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(_byte_alphabet().values()))
    writer.add_token_types([1] * c["vocab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def normal(rows: int, cols: int, std: float = 0.15) -> Any:
        return torch.randn(rows, cols, generator=gen) * std

    def add(name: str, weight: Any, kind: str) -> None:
        kind = (kinds or {}).get(name, kind)
        if kind == "q4_0":
            from gguf.quants import quantize

            writer.add_tensor(name, quantize(weight.numpy(), GGMLQuantizationType.Q4_0),
                              raw_dtype=GGMLQuantizationType.Q4_0)
        elif kind == "f32":
            writer.add_tensor(name, weight.numpy().astype(np.float32))
        elif kind == "f16":
            writer.add_tensor(name, weight.numpy().astype(np.float16))
        else:
            raw = GGMLQuantizationType.Q4_1 if kind == "q4_1" else GGMLQuantizationType.Q8_0
            writer.add_tensor(name, ggml_quantize(weight, kind).numpy(), raw_dtype=raw)

    hidden, inner, hd = c["hidden"], c["intermediate"], c["head_dim"]
    add("token_embd.weight", normal(c["vocab"], hidden, 0.5), "q8_0" if variant == "tied" else "f16")
    for i in range(c["layers"]):
        attn = "q8_0" if variant == "tied" and i == 1 else "q4_1"
        down = "q8_0" if variant == "tied" and i == 2 else "q4_1"
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * torch.randn(1, hidden, generator=gen)[0], "f32")
        add(f"blk.{i}.attn_q.weight", _permute(normal(c["heads"] * hd, hidden), c["heads"]), attn)
        add(f"blk.{i}.attn_k.weight", _permute(normal(c["kv_heads"] * hd, hidden), c["kv_heads"]), attn)
        add(f"blk.{i}.attn_v.weight", normal(c["kv_heads"] * hd, hidden), attn)
        add(f"blk.{i}.attn_output.weight", normal(hidden, c["heads"] * hd), "q4_1")
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * torch.randn(1, hidden, generator=gen)[0], "f32")
        add(f"blk.{i}.ffn_gate.weight", normal(inner, hidden), "q4_1")
        add(f"blk.{i}.ffn_up.weight", normal(inner, hidden), "q4_1")
        add(f"blk.{i}.ffn_down.weight", normal(hidden, inner), down)
    add("output_norm.weight", 1 + 0.1 * torch.randn(1, hidden, generator=gen)[0], "f32")
    if variant == "untied":
        add("output.weight", normal(c["vocab"], hidden), "q4_1")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
