"""The CPU decode kernels (torch.ops.largemodel_<level>.*) and the fused projections they stream.

small_linear must compute what F.linear computes (fp32 to rounding, bf16 to one bf16 rounding of
the output) for every shape a decode step produces; the norm, SwiGLU and decode-attention kernels
must compute what the model's tensor-op path computes; the engine must run with or without them.
Every kernel test runs once per instruction-set level this machine executes (an AVX2 host: avx2 and
generic; an AVX-512 host: avx512, avx2, generic; Arm: neon, generic), so the generic fallback is
tested everywhere; every level this compiler targets, runnable here or not, must at least build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from largemodel.runtime import cpu_kernels, transforms
from largemodel.runtime.model import Attention, ModelConfig, make_layout, rope_inv_freq
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage


def _skip_without_compiler() -> None:
    if shutil.which(os.environ.get("CXX") or "c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the kernels cannot be built (the engine uses torch ops)")


@pytest.fixture(scope="module", params=cpu_kernels.host_levels())
def kernel(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One level's small_linear, with every cpu_kernels call routed to that level for the test."""
    _skip_without_compiler()
    with cpu_kernels.using(request.param) as ops:
        yield ops.small_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("in_f", "out_f"), [(1, 1), (17, 3), (64, 65), (100, 300), (1024, 7), (2816, 130)])
def test_matches_linear(kernel: Any, dtype: torch.dtype, rows: int, in_f: int, out_f: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + in_f + out_f)
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype)
    with torch.inference_mode():
        got = kernel(x, w, b)
        unbiased = kernel(x, w)
    exact = x.double() @ w.double().T + b.double()
    assert got.dtype == dtype and got.shape == (rows, out_f)
    # Accumulation is fp32 in both dtypes; bf16 adds one rounding of the output (8 mantissa bits).
    rel = 2e-6 * in_f**0.5 if dtype == torch.float32 else 2**-8
    scale = (x.double().abs() @ w.double().abs().T + b.double().abs()).max().item()
    assert (got.double() - exact).abs().max().item() <= rel * scale + 1e-6
    assert torch.allclose(unbiased.double() + b.double(), got.double(), atol=rel * scale * 2 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 1024), (2, 7, 100)])
def test_rms_norm_matches_transformers(kernel: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(shape[-1])
    ref = LlamaRMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    with torch.inference_mode():
        got, want = cpu_kernels.rms_norm(x, ref.weight, 1e-5), ref(x)
        with cpu_kernels.disabled():
            fallback = cpu_kernels.rms_norm(x, ref.weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(fallback, want)
    # fp32: summation order only; bf16: the same two roundings, so at most one bf16 step apart.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    assert torch.allclose(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 1, 1024), (2, 3, 100)])
def test_add_rms_norm_is_the_add_then_the_norm(kernel: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(shape[-1] + 1)
    x, delta = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    with torch.inference_mode():
        h, normed = cpu_kernels.add_rms_norm(x, delta, weight, 1e-6)
        with cpu_kernels.disabled():
            ref_h, ref_normed = cpu_kernels.add_rms_norm(x, delta, weight, 1e-6)
        assert torch.equal(h, x + delta) and torch.equal(h, ref_h)
        assert torch.equal(normed, cpu_kernels.rms_norm(h, weight, 1e-6))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    assert torch.allclose(normed.float(), ref_normed.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 2816), (3, 2, 2 * 7), (5, 2 * 4096)])
def test_silu_mul_matches_torch(kernel: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    gate_up = (4 * torch.randn(shape, generator=gen)).to(dtype)
    with torch.inference_mode():
        got = cpu_kernels.silu_mul(gate_up)
        with cpu_kernels.disabled():
            want = cpu_kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(want, F.silu(gate) * up)
    assert got.dtype == dtype and got.shape == want.shape
    # exp's last bit may differ from torch's vectorized one; bf16 then rounds the same way or one step off.
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=0.0)
    assert torch.allclose(got.float(), want.float(), **tol)


def _attention(heads: int, kv_heads: int, head_dim: int, bias: bool, dtype: torch.dtype) -> Attention:
    """An Attention layer as build_stage makes one: in its dtype, fused and kernel-backed (KernelAttention)."""
    attn = Attention(attn_config(heads, kv_heads, head_dim).model_copy(update={"attention_bias": bias})).to(dtype)
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + head_dim)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.in_features**-0.5)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    transforms.fuse_attention(attn)
    transforms.apply_cpu_kernels(attn)
    assert isinstance(attn, transforms.KernelAttention)
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "bias"),
                         [(8, 2, 64, False), (4, 1, 24, True), (3, 3, 16, False), (16, 4, 128, False)])
def test_decode_attention_matches_the_tensor_op_path(kernel: Any, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                     heads: int, kv_heads: int, head_dim: int, bias: bool) -> None:
    """Prefill four prompts of different lengths into scattered, shuffled cache blocks (the paged cache's
    block tables), then run decode steps of one to four rows with the kernel and with the model's tensor-op
    attention (same projections): outputs agree and the caches are bit-identical."""
    attn = _attention(heads, kv_heads, head_dim, bias, dtype)
    max_len = 160
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(attn_config(heads, kv_heads,
                                                                                             head_dim)))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    block, per_row = 16, max_len // 16
    # four rows' block tables: disjoint, out of order, not starting at 0
    tables = torch.randperm(8 * per_row, generator=torch.Generator().manual_seed(7))[:4 * per_row].view(4, per_row)
    lengths = torch.tensor([1, 40, 130, 7])
    prompt = torch.randn(4, int(lengths.max()), heads * head_dim, generator=torch.Generator().manual_seed(1))
    runs = {}
    with torch.inference_mode():
        for use_kernel in (False, True):
            attn.setup_cache(8 * max_len, dtype, torch.device("cpu"))
            with cpu_kernels.disabled():  # the same prefill for both
                attn(prompt.to(dtype), make_layout(cos, sin, tables, torch.zeros(4, dtype=torch.long), lengths, block,
                                                   dtype))
            position, outs = lengths.clone(), []
            for step, rows in enumerate(([2], [0, 3, 1], [1, 2, 0, 3], [3], [0, 1])):
                pick = torch.tensor(rows)
                layout = make_layout(cos, sin, tables[pick], position[pick], torch.ones(len(rows), dtype=torch.long),
                                     block, dtype)
                token = torch.randn(len(rows), 1, heads * head_dim, generator=torch.Generator().manual_seed(step))
                with monkeypatch.context() as patch:
                    if not use_kernel:
                        patch.setattr(cpu_kernels, "decode_attention_ready", lambda x: False)
                    outs.append(attn(token.to(dtype), layout))
                position[pick] += 1
            runs[use_kernel] = (attn.k_cache.clone(), attn.v_cache.clone(), outs)
    # fp32: summation order only; bf16: torch's roundings, then at most a bf16 step or two apart.
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=2e-2)
    ref, got = runs[False], runs[True]
    for want, have in zip(ref[2], got[2], strict=True):
        assert have.dtype == dtype and have.shape == want.shape
        assert torch.allclose(have.float(), want.float(), **tol), (have.float() - want.float()).abs().max()
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])  # RoPE'd keys and values: bit-exact


def attn_config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=heads * head_dim, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=10000.0)


def test_decode_attention_refuses_bad_inputs(kernel: Any) -> None:
    """A bad call raises (the engine reports it) and writes nothing into the cache."""
    k = torch.zeros(1, 16, 16)  # [kv_heads, cache_len, head_dim]
    qkv, cos = torch.randn(2, 3 * 16), torch.ones(2, 16)
    with pytest.raises(RuntimeError, match="written twice"):
        cpu_kernels.decode_attention(qkv, cos, cos, k, k.clone(), torch.tensor([[1, 2], [3, 1]]), torch.tensor([0, 1]),
                                     1, 1, 1.0)
    with pytest.raises(RuntimeError, match="outside the index"):
        cpu_kernels.decode_attention(qkv, cos, cos, k, k.clone(), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 2]),
                                     1, 1, 1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.decode_attention(qkv, cos, cos, k, k.clone(), torch.tensor([[0, 1], [16, 3]]), torch.tensor([0, 1]),
                                     1, 1, 1.0)
    k2 = torch.zeros(2, 16, 16)
    with pytest.raises(RuntimeError, match="cannot share"):
        cpu_kernels.decode_attention(torch.randn(2, 7 * 16), cos, cos, k2, k2.clone(), torch.tensor([[0], [1]]),
                                     torch.tensor([0, 0]), 3, 2, 1.0)
    assert not k.any() and not k2.any()


def test_dispatch_shapes_and_fallbacks(kernel: Any) -> None:
    lin = cpu_kernels.Linear(64, 32)
    with torch.inference_mode():
        for shape in [(1, 1, 64), (2, 2, 64), (2, 3, 64), (5, 9, 64)]:  # decode (kernel) .. prefill (oneDNN)
            x = torch.randn(shape)
            assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5), shape
        with cpu_kernels.disabled():
            x = torch.randn(2, 3, 64)
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    # With autograd on (training, tests of gradients) F.linear is used and gradients flow.
    y = lin(torch.randn(1, 64, requires_grad=True)).sum()
    y.backward()
    assert lin.weight.grad is not None


def test_onednn_gemm_matches_linear() -> None:
    op = cpu_kernels.onednn_linear()
    if op is None:
        pytest.skip("this torch build has no working oneDNN linear: F.linear serves every fp32 GEMM")
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 40, 300, generator=gen), torch.randn(70, 300, generator=gen), torch.randn(70, generator=gen)
    with torch.inference_mode():
        assert torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_fused_projections_share_storage_with_named_parameters(kernel: Any, checkpoints: dict[str, Any]) -> None:
    """q/k/v and gate/up are one Linear each, kernel-backed; the loader fills their row blocks by checkpoint name."""
    model, _ = build_stage(Path(checkpoints["models"]["gqa"]["dir"]), ParallelContext(), torch.float32,
                           torch.device("cpu"), 1, 16)
    layer = next(iter(model.model.layers.values()))
    attn, mlp = layer.self_attn, layer.mlp
    assert isinstance(attn, transforms.KernelAttention) and isinstance(mlp, transforms.KernelMLP)
    assert isinstance(attn.qkv_proj, cpu_kernels.Linear) and isinstance(mlp.gate_up_proj, cpu_kernels.Linear)
    assert not hasattr(attn, "k_proj") and not hasattr(mlp, "up_proj")
    blocks = dict(transforms.checkpoint_tensors(model))
    fused = attn.qkv_proj.weight
    q, k, v = (blocks[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(fused, torch.cat([q, k, v])) and q.shape[0] == attn.n_heads * attn.head_dim
    assert q.data_ptr() == fused.data_ptr() and k.data_ptr() == fused[q.shape[0]:].data_ptr()
    up = blocks["model.layers.0.mlp.up_proj.weight"]
    assert up.data_ptr() == mlp.gate_up_proj.weight[up.shape[0]:].data_ptr()
    assert "model.layers.0.self_attn.qkv_proj.weight" in dict(model.named_parameters())


def _run_module(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "largemodel.runtime.cpu_kernels"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1", **env})


def test_disabled_kernel_falls_back_with_a_logged_reason() -> None:
    done = _run_module({"LARGEMODEL_CPU_KERNELS": "0"})
    assert done.returncode == 0
    assert "unavailable (torch ops are used)" in done.stdout
    assert "event=kernel_unavailable" in done.stderr and "LARGEMODEL_CPU_KERNELS" in done.stderr


# The two tests below run `python -m largemodel.runtime.cpu_kernels`, which picks its own level: they
# are not parametrized by the `kernel` fixture (each would run the same child once per host level).
def test_prebuilt_library_loads_without_building_or_writing(tmp_path: Path) -> None:
    """What a pod with a read-only root filesystem does: load the image's library, write nothing."""
    _skip_without_compiler()
    kernels = tmp_path / "kernels"
    built = _run_module({"LARGEMODEL_KERNEL_DIR": str(kernels)})
    assert built.returncode == 0 and "event=kernel_built" in built.stderr, built.stderr
    kernels.chmod(0o555)
    try:
        loaded = _run_module({"LARGEMODEL_KERNEL_DIR": str(kernels)})
    finally:
        kernels.chmod(0o755)
    best = cpu_kernels.host_levels()[0]
    assert loaded.returncode == 0 and f"{best} ready at" in loaded.stdout, loaded.stderr
    assert "event=kernel_build " not in loaded.stderr
    assert sorted(p.name for p in kernels.iterdir()) == [cpu_kernels.library_path(best).name]


def test_isa_can_be_lowered_by_environment() -> None:
    """LARGEMODEL_CPU_KERNELS_ISA picks a lower level than the best (here: generic); an unknown one is ignored."""
    _skip_without_compiler()
    done = _run_module({"LARGEMODEL_CPU_KERNELS_ISA": "generic"})
    assert done.returncode == 0 and "generic ready at" in done.stdout, done.stderr
    odd = _run_module({"LARGEMODEL_CPU_KERNELS_ISA": "no-such-isa"})
    assert odd.returncode == 0 and f"{cpu_kernels.host_levels()[0]} ready at" in odd.stdout, odd.stderr
    assert "event=kernel_isa_ignored" in odd.stderr


def test_levels_match_this_cpu() -> None:
    """The levels tested here are what /proc/cpuinfo allows, best first, and always include generic."""
    levels, flags = cpu_kernels.host_levels(), cpu_kernels.cpu_flags()
    assert levels[-1] == "generic" and set(levels) <= set(cpu_kernels.buildable_levels())
    assert ("avx2" in levels) == ({"avx2", "fma", "f16c"} <= flags and "avx2" in cpu_kernels.buildable_levels())
    assert ("avx512" in levels) == ("avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags
                                    and "avx2" in levels)
    with pytest.raises(RuntimeError, match="cannot run"):
        cpu_kernels.load_level(next(lv for lv in cpu_kernels.buildable_levels() + ["neon", "avx512"]
                                    if lv not in levels))


@pytest.mark.parametrize("level", [lv.name for lv in cpu_kernels.LEVELS if lv.name != "generic"])
def test_every_level_compiles(level: str, tmp_path: Path) -> None:
    """Each level builds with this host's compiler, or its cross compiler for Arm, runnable here or not
    (an AVX-512 build on an AVX2 machine, NEON's object file on x86-64 with this torch's headers)."""
    spec = cpu_kernels.BY_NAME[level]
    if cpu_kernels.compiles_here(spec):
        cxx, link = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"), True
        if level in cpu_kernels.host_levels() and cpu_kernels.library_path(level).exists():
            return  # the kernel fixture built and loaded it already
    else:
        cross = {"neon": "aarch64-linux-gnu-g++", "avx512": "x86_64-linux-gnu-g++", "avx2": "x86_64-linux-gnu-g++"}
        cxx, link = shutil.which(cross[level]), False
        if cxx is None:
            pytest.skip(f"no {cross[level]} here: install it (Debian: g++-aarch64-linux-gnu) to compile-check {level}")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    out = tmp_path / ("k.so" if link else "k.o")
    done = subprocess.run(cpu_kernels.compile_command(level, out, cxx, link=link), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.stat().st_size > 0


def test_no_compiler_falls_back(tmp_path: Path) -> None:
    done = _run_module({"LARGEMODEL_KERNEL_DIR": str(tmp_path / "k"), "CXX": str(tmp_path / "no-such-compiler")})
    assert done.returncode == 0 and "unavailable" in done.stdout
    assert "event=kernel_unavailable" in done.stderr


def test_built_library_is_readable_by_every_user(tmp_path: Path) -> None:
    """The image builds the kernels as root and its ranks load them as uid 1000: the library must not
    keep the 0600 of the temporary file it was written to (dlopen needs to read it)."""
    _skip_without_compiler()
    target = tmp_path / "k.so"
    cpu_kernels.build(target, "generic")
    assert target.stat().st_mode & 0o555 == 0o555, oct(target.stat().st_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize(("in_f", "out_f"), [(1, 1), (17, 3), (64, 65), (100, 300), (1024, 7), (2816, 130)])
def test_int8_linear_matches_the_dequantized_reference(kernel: Any, dtype: torch.dtype, rows: int, in_f: int,
                                                       out_f: int) -> None:
    """int8_linear(x, q, scale, b) = x @ (q * scale[:, None]).T + b: fp32 accumulation, one output rounding."""
    from largemodel.runtime.quant import dequantize_rows, quantize_rows

    ops = torch.ops.__getattr__(f"largemodel_{cpu_kernels.level()}")
    gen = torch.Generator().manual_seed(rows * 1000 + in_f + out_f)
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    q, scale = quantize_rows(torch.randn(out_f, in_f, generator=gen))
    b = torch.randn(out_f, generator=gen).to(dtype)
    with torch.inference_mode():
        got = ops.int8_linear(x, q, scale, b)
        unbiased = ops.int8_linear(x, q, scale)
    w = dequantize_rows(q, scale).double()
    exact = x.double() @ w.T + b.double()
    assert got.dtype == dtype and got.shape == (rows, out_f)
    rel = 2e-6 * in_f**0.5 if dtype == torch.float32 else 2**-8
    bound = (x.double().abs() @ w.abs().T + b.double().abs()).max().item()
    assert (got.double() - exact).abs().max().item() <= rel * bound + 1e-6
    assert torch.allclose(unbiased.double() + b.double(), got.double(), atol=rel * bound * 2 + 1e-6)


def _ggml_weight(kind: str, out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGML blocks: every byte of qs random (all nibbles and int8 values), fp16 d (and m) of mixed
    magnitude, some fp16 subnormals and zeros among them (the widening must handle those exactly)."""
    nb = in_f // 32
    head = (torch.randn(out_f, nb, 2, generator=gen) * 0.05).to(torch.float16)
    pick = torch.rand(out_f, nb, 2, generator=gen)
    head = torch.where(pick < 0.1, torch.tensor(3e-6, dtype=torch.float16), head)  # fp16 subnormal
    head = torch.where(pick > 0.95, torch.tensor(0.0, dtype=torch.float16), head)
    qs = torch.randint(0, 256, (out_f, nb, 32 if kind == "q8_0" else 16), generator=gen, dtype=torch.uint8)
    scales = head.view(torch.uint8).reshape(out_f, nb, 4)
    blocks = torch.cat((scales[..., :2], qs) if kind == "q8_0" else (scales, qs), dim=-1)
    return blocks.reshape(out_f, -1).contiguous()


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize(("in_f", "out_f"), [(32, 1), (64, 7), (96, 65), (576, 33), (1024, 130)])
def test_ggml_linear_matches_the_dequantized_reference(kernel: Any, kind: str, dtype: torch.dtype, rows: int,
                                                       in_f: int, out_f: int) -> None:
    """q4_1_linear / q8_0_linear(x, q, b) = x @ ggml_dequantize(q).T + b to fp32 rounding (bf16: one more
    rounding of the output), at this level."""
    ops = torch.ops.__getattr__(f"largemodel_{cpu_kernels.level()}")
    op = getattr(ops, f"{kind}_linear")
    gen = torch.Generator().manual_seed(rows * 1000 + in_f + out_f)
    q = _ggml_weight(kind, out_f, in_f, gen)
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype)
    with torch.inference_mode():
        got, unbiased = op(x, q, b), op(x, q)
    w = cpu_kernels.ggml_dequantize(q, kind).double()
    exact = x.double() @ w.T + b.double()
    assert got.dtype == dtype and got.shape == (rows, out_f) and unbiased.shape == (rows, out_f)
    rel = 2e-6 * in_f**0.5 if dtype == torch.float32 else 2**-8
    bound = (x.double().abs() @ w.abs().T + b.double().abs()).max().item()
    assert (got.double() - exact).abs().max().item() <= rel * bound + 1e-6
    assert (unbiased.double() - (exact - b.double())).abs().max().item() <= rel * bound + 1e-6


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_ggml_linear_dispatch_shapes_and_fallback(kernel: Any, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """cpu_kernels.ggml_linear takes leading batch dims; up to GGML_MAX_ROWS rows it is the kernel's result,
    beyond (or without kernels, or with autograd on) the chunked dequantize + GEMM, and both agree."""
    gen = torch.Generator().manual_seed(5)
    q = _ggml_weight(kind, 70, 128, gen)
    w = cpu_kernels.ggml_dequantize(q, kind)
    b = torch.randn(70, generator=gen)
    op = getattr(torch.ops.__getattr__(f"largemodel_{cpu_kernels.level()}"), f"{kind}_linear")
    calls: list[tuple[int, ...]] = []
    real = cpu_kernels._ops

    class Counting:
        def __getattr__(self, name: str) -> Any:
            target = getattr(real, name)

            def call(x: torch.Tensor, *args: Any) -> Any:
                calls.append(tuple(x.shape))
                return target(x, *args)
            return call

    with torch.inference_mode():
        with monkeypatch.context() as patch:
            patch.setattr(cpu_kernels, "_ops", Counting())
            for shape in [(1, 1, 128), (2, 3, 128), (4, 4, 128), (3, 6, 128)]:  # 1, 6, 16 rows: kernel; 18: not
                x = torch.randn(shape, generator=gen)
                got = cpu_kernels.ggml_linear(x, q, kind, b)
                assert got.shape == (*shape[:-1], 70)
                torch.testing.assert_close(got, x @ w.T + b, rtol=1e-5, atol=1e-4)
        assert calls == [(1, 1, 128), (2, 3, 128), (4, 4, 128)]
        x = torch.randn(2, 5, 128, generator=gen)
        torch.testing.assert_close(cpu_kernels.ggml_linear(x, q, kind), op(x, q), rtol=1e-5, atol=1e-4)
        with cpu_kernels.disabled():
            torch.testing.assert_close(cpu_kernels.ggml_linear(x, q, kind), x @ w.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(1, 128, requires_grad=True)
    cpu_kernels.ggml_linear(x, q, kind).sum().backward()  # autograd on: the fallback, gradients flow
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_ggml_linear_refuses_bad_inputs(kernel: Any, kind: str) -> None:
    """A bad call raises a clear error (the op's RuntimeError, ggml_linear's ValueError) and never crashes."""
    op = getattr(torch.ops.__getattr__(f"largemodel_{cpu_kernels.level()}"), f"{kind}_linear")
    size = cpu_kernels.GGML_BLOCK_BYTES[kind]
    q = _ggml_weight(kind, 8, 64, torch.Generator().manual_seed(1))
    x = torch.randn(2, 64)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="contiguous uint8"):
            op(x, q.view(torch.int8))
        with pytest.raises(RuntimeError, match="contiguous uint8"):
            op(x, torch.zeros(8, 64))
        with pytest.raises(RuntimeError, match="contiguous uint8"):
            op(x, q[:, :size])  # a slice of whole blocks, not contiguous: the caller copies or falls back
        with pytest.raises(RuntimeError, match="whole"):
            op(x, torch.zeros(8, 2 * size + 1, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match="features"):
            op(torch.randn(2, 96), q)
        with pytest.raises(RuntimeError, match="activations"):
            op(x.double(), q)
        with pytest.raises(RuntimeError, match="bias"):
            op(x, q, torch.zeros(7))
        with pytest.raises(ValueError, match="blocks"):
            cpu_kernels.ggml_linear(x, torch.zeros(8, 2 * size + 1, dtype=torch.uint8), kind)
        with pytest.raises(ValueError, match="blocks"):
            cpu_kernels.ggml_linear(x, q.view(torch.int8), kind)
        with pytest.raises(ValueError, match="unknown"):
            cpu_kernels.ggml_linear(x, q, "q4_0")
