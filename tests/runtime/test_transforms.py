"""The transformations build_stage applies after tensor parallelism (runtime/transforms.py).

The plain model (runtime/model.py) is the reference: fusing q/k/v and gate/up and swapping in the
kernel-backed modules must give the same logits, the kernel modules must fall back to exactly the
plain ops when the kernels are off, and loading a fused model must read every checkpoint tensor
straight into its row block of the fused parameter, giving what loading the plain model gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from largemodel.runtime import cpu_kernels, transforms, weights
from largemodel.runtime.model import MLP, Attention, CausalLM, DecoderLayer, ModelConfig, RMSNorm, load_config
from largemodel.runtime.parallel import ParallelContext, VocabParallelLMHead, apply_tensor_parallel
from largemodel.runtime.weights import load_weights


def build(model_dir: Path, ctx: ParallelContext, fused: bool, kernels: bool, quantization: str = "none") -> CausalLM:
    """build_stage's sequence with each transformation optional (one stage holding every layer)."""
    from largemodel.runtime.quant import apply_quantization

    config = load_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(config, range(config.num_hidden_layers))
    shards = apply_tensor_parallel(model, ctx)
    if fused:
        transforms.fuse_projections(model)
    if kernels:
        transforms.apply_cpu_kernels(model)
    apply_quantization(model, quantization)
    model = model.to_empty(device="cpu").eval()
    if model.lm_head is not None and model.model.embed_tokens is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, config, model_dir, shards)
    model.setup_caches(4, 64, torch.float32, torch.device("cpu"))
    return model


def run(model: CausalLM, prompts: list[list[int]], steps: int) -> list[Tensor]:
    """Logits of a padded prefill of `prompts` (slots 2, 0, 1), then of `steps` greedy decode steps."""
    slots = torch.tensor([2, 0, 1])[: len(prompts)]
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    out = []
    with torch.inference_mode():
        logits = model(tokens, model.layout(slots, torch.zeros_like(lengths), lengths, torch.float32))
        out.append(logits)
        position = lengths.clone()
        for _ in range(steps):
            step = logits.argmax(-1)[:, None]
            logits = model(step, model.layout(slots, position, torch.ones_like(lengths), torch.float32))
            out.append(logits)
            position += 1
    return out


PROMPTS = [[5, 9, 3, 17, 2, 8, 30], [1, 4], [12, 7, 7, 40, 6]]


def tiny_config(**fields: Any) -> ModelConfig:
    return ModelConfig(**fields, rope_theta=10000.0)


@pytest.mark.parametrize("variant", ["gqa", "qwen2", "tied"])
def test_transformed_model_gives_the_plain_models_logits(checkpoints: dict[str, Any], variant: str) -> None:
    """Fused projections and kernel modules compute what the plain model computes (fp32: to rounding);
    with the kernels off the kernel modules are bit for bit the fused model."""
    model_dir = Path(checkpoints["models"][variant]["dir"])
    ctx = ParallelContext()
    plain = run(build(model_dir, ctx, fused=False, kernels=False), PROMPTS, 3)
    fused = run(build(model_dir, ctx, fused=True, kernels=False), PROMPTS, 3)
    kernel_model = build(model_dir, ctx, fused=True, kernels=True)
    with cpu_kernels.disabled():
        fallback = run(kernel_model, PROMPTS, 3)
    loaded = cpu_kernels.load()
    print(f"cpu kernels loaded: {loaded} (level {cpu_kernels.level()})")
    kernel_model.setup_caches(4, 64, torch.float32, torch.device("cpu"))
    kernel = run(kernel_model, PROMPTS, 3)
    for want, fused_out, fallback_out, kernel_out in zip(plain, fused, fallback, kernel, strict=True):
        assert fused_out.shape == want.shape == (len(PROMPTS), load_config(model_dir).vocab_size)
        assert torch.allclose(fused_out, want, rtol=1e-5, atol=1e-5), (fused_out - want).abs().max()
        assert torch.equal(fallback_out, fused_out)
        assert torch.allclose(kernel_out, want, rtol=1e-4, atol=1e-4), (kernel_out - want).abs().max()


@pytest.mark.parametrize(("variant", "quantization"), [
    ("gqa", "none"), ("qwen2", "none"), ("tied", "none"), ("gqa", "int8"), ("qwen2", "int8"), ("tied", "int8"),
    ("gqa", "q4"), ("tied", "q4"),  # qwen2's 48-wide rows are not whole Q4_1 blocks
])
def test_decode_layers_is_bit_for_bit_the_module_path(checkpoints: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                       variant: str, quantization: str) -> None:
    """KernelCausalLM's one-call decode (cpu_kernels.decode_layers) gives exactly the logits of the
    kernel modules layer by layer, fp32, int8 and q4 (Q4_1 blocks), q/k/v biases included; a hook anywhere turns it off."""
    # The host's best level, loaded here: an earlier test in this process may have left load() off.
    with cpu_kernels.using(cpu_kernels.host_levels()[0]):
        _check_decode_layers(Path(checkpoints["models"][variant]["dir"]), monkeypatch, quantization)


def _check_decode_layers(model_dir: Path, monkeypatch: pytest.MonkeyPatch, quantization: str) -> None:
    model = build(model_dir, ParallelContext(), fused=True, kernels=True, quantization=quantization)
    assert type(model) is transforms.KernelCausalLM
    calls = []
    fused = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers", lambda *a: calls.append(1) or fused(*a))
    model.setup_caches(4, 64, torch.float32, torch.device("cpu"))
    one_call = run(model, PROMPTS, 4)
    assert len(calls) == 4  # every decode step, never the padded prefill
    monkeypatch.setattr(transforms.KernelCausalLM, "decode_stack", lambda self, dtype: None)
    model.setup_caches(4, 64, torch.float32, torch.device("cpu"))
    by_layer = run(model, PROMPTS, 4)
    assert len(calls) == 4
    for a, b in zip(one_call, by_layer, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    monkeypatch.undo()
    assert transforms.KernelCausalLM.decode_stack(model, torch.float32) is not None
    handle = model.model.layers["0"].mlp.down_proj.register_forward_hook(lambda *_: None)  # like TP's all-reduce
    assert transforms.KernelCausalLM.decode_stack(model, torch.float32) is None
    handle.remove()
    assert transforms.KernelCausalLM.decode_stack(model, torch.bfloat16) is None  # fp32 weights, bf16 input

def test_fused_and_kernel_modules_replace_the_plain_ones() -> None:
    """After TP (tp=2 here), fuse_projections leaves no separate q/k/v or gate/up, apply_cpu_kernels leaves
    no plain Linear, norm or layer, and the row-parallel all-reduce hooks survive the swaps."""
    config = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = CausalLM(config, range(2))
    apply_tensor_parallel(model, ParallelContext(tp=2, tp_rank=1))
    transforms.fuse_projections(model)
    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        assert type(attn) is transforms.FusedAttention and type(mlp) is transforms.FusedMLP
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")) and not hasattr(mlp, "gate_proj")
        # tp=2: 2 query heads and 1 KV head of 8 dims per rank; half the 64 inner rows each for gate and up.
        assert attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 8, 32) and mlp.gate_up_proj.weight.shape == (64, 32)
        assert attn.parts == {"qkv_proj": [("q_proj", 16), ("k_proj", 8), ("v_proj", 8)]}
    swapped = transforms.apply_cpu_kernels(model)
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.Linear, RMSNorm, DecoderLayer, Attention, MLP, transforms.FusedAttention,
                        transforms.FusedMLP, VocabParallelLMHead}, kinds
    assert {cpu_kernels.Linear, transforms.KernelRMSNorm, transforms.KernelDecoderLayer, transforms.KernelAttention,
            transforms.KernelMLP, transforms.KernelVocabParallelLMHead} <= kinds
    # per layer: qkv, o, gate_up, down, two norms, attention, MLP, the layer; then the final norm, LM head, model
    assert swapped == 2 * 9 + 3
    assert type(model) is transforms.KernelCausalLM
    layer = model.model.layers["0"]
    assert len(layer.self_attn.o_proj._forward_hooks) == 1 and len(layer.mlp.down_proj._forward_hooks) == 1
    assert len(layer.self_attn.qkv_proj._forward_hooks) == 0


@pytest.mark.parametrize(("variant", "ctx"), [
    ("gqa", ParallelContext()), ("gqa", ParallelContext(tp=2, tp_rank=1)),
    ("qwen2", ParallelContext()), ("qwen2", ParallelContext(tp=3, tp_rank=2)),  # q/k/v bias
    ("mqa", ParallelContext(tp=4, tp_rank=2)),  # the one KV head replicated
], ids=["gqa-tp1", "gqa-tp2-rank1", "qwen2-tp1", "qwen2-tp3-rank2", "mqa-tp4-rank2"])
def test_loading_fills_fused_parameters_in_place(checkpoints: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 variant: str, ctx: ParallelContext) -> None:
    """Every checkpoint tensor is read straight into its row block of the fused parameter (the direct
    reader, no temporary), and the fused parameters hold exactly the plain model's q/k/v and gate/up."""
    model_dir = Path(checkpoints["models"][variant]["dir"])
    plain = build(model_dir, ctx, fused=False, kernels=False)
    targets: list[int] = []

    def counted(entry: Any, shard: Any, param: Tensor, direct: Any = weights.direct_range) -> Any:
        where = direct(entry, shard, param)
        if where is not None:
            targets.append(param.data_ptr())
        return where

    monkeypatch.setattr(weights, "direct_range", counted)
    fused = build(model_dir, ctx, fused=True, kernels=True)
    blocks = transforms.checkpoint_tensors(fused)
    plain_params = dict(plain.named_parameters())
    assert sorted(name for name, _ in blocks) == sorted(plain_params)
    for name, block in blocks:
        assert torch.equal(block, plain_params[name]), name
    fused_ptrs = {name: block.data_ptr() for name, block in blocks}
    # Row shards and whole tensors take the direct path; the q/k/v and gate/up blocks all do.
    for name, ptr in fused_ptrs.items():
        if any(part in name for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert ptr in targets, name
    for index, layer in fused.model.layers.items():
        attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{index}"
        want = torch.cat([plain_params[f"{p}.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(attn.qkv_proj.weight, want)
        assert fused_ptrs[f"{p}.self_attn.q_proj.weight"] == attn.qkv_proj.weight.data_ptr()
        if attn.qkv_proj.bias is not None:
            bias = torch.cat([plain_params[f"{p}.self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
            assert torch.equal(attn.qkv_proj.bias, bias)
        gate_up = torch.cat([plain_params[f"{p}.mlp.gate_proj.weight"], plain_params[f"{p}.mlp.up_proj.weight"]])
        assert torch.equal(mlp.gate_up_proj.weight, gate_up)
    assert variant != "qwen2" or fused.model.layers["0"].self_attn.qkv_proj.bias is not None


def test_fusing_a_filled_module_keeps_its_values() -> None:
    """fuse_attention / fuse_mlp on allocated modules concatenate the values (tests and tools fuse after filling)."""
    config = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(0)
    mlp = MLP(config)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = mlp(x)
        transforms.fuse_mlp(mlp)
        assert torch.allclose(mlp(x), want, rtol=1e-6, atol=1e-6)
    attn = Attention(config)
    q = attn.q_proj.weight.detach().clone()
    transforms.fuse_attention(attn)
    assert torch.equal(attn.qkv_proj.weight[:32], q) and attn.qkv_proj.bias is not None
