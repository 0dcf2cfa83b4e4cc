"""Weight-only int8 (issue 19): the quantizer, the Int8Linear model built by build_stage, and its exactness.

The reference is the same model dequantized to fp32 (quant.dequantize_int8: q * scale, the exact value of
what the int8 model holds): the int8 path differs from it only in summation order and where the scale
multiplies (after the dot product instead of into each weight), so last-position logits agree to
LOGIT_ATOL and the first 32 greedy tokens are equal, at tp=1 and tp=2.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from largemodel.runtime import cpu_kernels, quant
from largemodel.runtime.engine import Engine, SamplingParams
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage
from tests.support import tiny_models

LOGIT_ATOL = 1e-4  # fp32 logits of order 1; summation-order differences are ~1e-6
GREEDY = SamplingParams()


def test_quantize_rows_is_symmetric_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=gen) * torch.linspace(0.01, 5, 33)[:, None]
    w[5] = 0.0
    q, scale = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (33,)
    assert torch.equal(scale, w.abs().amax(1) / 127) and scale[5] == 0 and not q[5].any()
    assert q.abs().amax(1)[torch.arange(33) != 5].eq(127).all()
    back = quant.dequantize_rows(q, scale)
    assert ((back - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()


def test_quantization_values_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(quant.QUANTIZATION_ENV, raising=False)
    assert quant.quantization_from_env() == "none"
    monkeypatch.setenv(quant.QUANTIZATION_ENV, "INT8")
    assert quant.quantization_from_env() == "int8"
    for served in ("q4", "gguf"):
        monkeypatch.setenv(quant.QUANTIZATION_ENV, served)
        assert quant.quantization_from_env() == served
    for bad, why in (("int4", "not one of"), ("Q4_K", "not one of")):
        monkeypatch.setenv(quant.QUANTIZATION_ENV, bad)
        with pytest.raises(ValueError, match=why):
            quant.quantization_from_env()


def _stage(model_dir: Path, ctx: ParallelContext, dequantized: bool) -> Any:
    model, _ = build_stage(model_dir, ctx, torch.float32, torch.device("cpu"), 4, 64, quantization="int8")
    if dequantized:
        assert quant.dequantize_int8(model) > 0
    return model


def _drive(model: Any, ctx: ParallelContext, prompts: list[list[int]]) -> dict[str, Any]:
    from world_main import drive

    engine = Engine(model, ctx)
    try:
        return drive(engine, prompts, tiny_models.NEW_TOKENS, GREEDY)
    finally:
        if ctx.tp > 1:
            engine.shutdown()


def _compare(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logits"], want["logits"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("name", [v.name for v in tiny_models.VARIANTS])
def test_int8_model_matches_its_dequantized_model_tp1(checkpoints: dict[str, Any], name: str) -> None:
    model_dir = Path(checkpoints["models"][name]["dir"])
    model = _stage(model_dir, ParallelContext(), dequantized=False)
    layer = next(iter(model.model.layers.values()))
    linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    assert all(isinstance(m, quant.Int8Linear) and m.weight.dtype == torch.int8 for m in linears)
    assert all(m.weight_scale.dtype == torch.float32 for m in linears)
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    if name == "qwen2":
        assert layer.self_attn.qkv_proj.bias is not None and layer.self_attn.qkv_proj.bias.dtype == torch.float32
    got = _drive(model, ParallelContext(), checkpoints["prompts"])
    want = _drive(_stage(model_dir, ParallelContext(), dequantized=True), ParallelContext(), checkpoints["prompts"])
    _compare(got, want)


def test_prequantized_checkpoint_is_read_as_is(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """A checkpoint holding I8 weights and `.weight_scale` loads the same model as quantizing at load."""
    from safetensors.torch import load_file, save_file

    src = Path(checkpoints["models"]["qwen2"]["dir"])
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith("_proj.weight") and ".layers." in key:
            out[key], out[key + "_scale"] = quant.quantize_rows(t)
        else:
            out[key] = t
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(out, str(tmp_path / "model.safetensors"))
    # tp=1: identical. tp=3: the column-parallel projections (rows sliced, with their scales) are
    # identical; row-parallel ones differ by design (a pre-quantized row's scale is the whole row's absmax,
    # quantizing at load takes the rank's slice's), so they are checked through the model's output below.
    for tp, tp_rank in ((1, 0), (3, 1)):
        ctx = ParallelContext(tp=tp, tp_rank=tp_rank)
        a, _ = build_stage(tmp_path, ctx, torch.float32, torch.device("cpu"), 1, 16, quantization="int8")
        b, _ = build_stage(src, ctx, torch.float32, torch.device("cpu"), 1, 16, quantization="int8")
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        same = [k for k in pa if tp == 1 or not any(r in k for r in ("o_proj", "down_proj"))]
        assert len(same) > len(pa) // 2 and all(torch.equal(pa[k], pb[k]) for k in same), tp
    a, _ = build_stage(tmp_path, ParallelContext(), torch.float32, torch.device("cpu"), 4, 64, quantization="int8")
    b, _ = build_stage(src, ParallelContext(), torch.float32, torch.device("cpu"), 4, 64, quantization="int8")
    _compare(_drive(a, ParallelContext(), checkpoints["prompts"]), _drive(b, ParallelContext(), checkpoints["prompts"]))
    with pytest.raises(Exception, match="MODEL_QUANTIZATION=int8"):
        build_stage(tmp_path, ParallelContext(), torch.float32, torch.device("cpu"), 1, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tp_rank(rank: int, port: int, model_dir: str, prompts: list[list[int]], out: str) -> None:
    import json

    import torch.distributed as dist

    from largemodel.runtime.engine import worker_loop
    from largemodel.runtime.parallel import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(rank, 2, 2, 1, "127.0.0.1", port, timeout_s=120)
    try:
        results = {}
        for dequantized in (False, True):
            model = _stage(Path(model_dir), ctx, dequantized)
            if rank == 0:
                results[str(dequantized)] = _drive(model, ctx, prompts)
            else:
                worker_loop(model, ctx)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_int8_model_matches_its_dequantized_model_tp2(checkpoints: dict[str, Any], name: str, tmp_path: Path) -> None:
    import json

    out = tmp_path / "result.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_tp_rank, args=(_free_port(), checkpoints["models"][name]["dir"], checkpoints["prompts"],
                                       str(out)), nprocs=2, start_method="spawn")
    results = json.loads(out.read_text())
    _compare(results["False"], results["True"])


def test_int8_kernel_is_used_for_decode_rows(checkpoints: dict[str, Any]) -> None:
    """Small batches go to the kernel when it is loaded; the fallback computes the same thing."""
    if shutil.which(os.environ.get("CXX") or "c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the kernels cannot be built (the engine uses torch ops)")
    gen = torch.Generator().manual_seed(1)
    q, scale = quant.quantize_rows(torch.randn(300, 200, generator=gen))
    bias = torch.randn(300, generator=gen)
    # The host's best level, whatever earlier tests left loaded or switched off in this process.
    with torch.inference_mode(), cpu_kernels.using(cpu_kernels.host_levels()[0]):
        for rows in (1, 4, cpu_kernels.INT8_MAX_ROWS, cpu_kernels.INT8_MAX_ROWS + 1, 40):
            x = torch.randn(rows, 200, generator=gen)
            got = cpu_kernels.int8_linear(x, q, scale, bias)
            with cpu_kernels.disabled():
                fallback = cpu_kernels.int8_linear(x, q, scale, bias)
            ref = x @ quant.dequantize_rows(q, scale).T + bias
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4) and torch.allclose(fallback, ref, rtol=1e-5, atol=1e-4)
