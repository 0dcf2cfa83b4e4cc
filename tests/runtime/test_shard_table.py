"""apply_tensor_parallel on the meta device: the exact Shard table and shapes for tp 1, 2, 4, and the refusals.

No process group and no weights: a stage is built on torch.device("meta") and cut with a plain
ParallelContext (one that only counts all-reduces where a forward runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from largemodel.runtime.model import CausalLM, ModelConfig
from largemodel.runtime.parallel import (
    ParallelContext,
    Shard,
    TensorParallelError,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    apply_tensor_parallel,
    valid_tp_sizes,
)

# Llama with every bias (q/k/v and o from attention_bias, gate/up/down from mlp_bias), GQA with 2 KV heads
# (so tp=4 replicates them), head_dim 8, and a prime vocabulary (padded for every tp > 1).
GQA = ModelConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, attention_bias=True, mlp_bias=True)
# Qwen2: q/k/v bias but none on o_proj; one KV head (MQA: every rank keeps a copy); vocab 100 splits evenly.
MQA = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1)

# Per tp, per tp rank: (start, stop) of the query rows, KV rows, MLP inner rows and vocab rows (GQA).
GQA_SLICES = {
    2: {"q": [(0, 32), (32, 64)], "kv": [(0, 8), (8, 16)], "inner": [(0, 48), (48, 96)],
        "vocab": [(0, 66), (66, 132)]},
    4: {"q": [(0, 16), (16, 32), (32, 48), (48, 64)], "kv": [(0, 8), (0, 8), (8, 16), (8, 16)],
        "inner": [(0, 24), (24, 48), (48, 72), (72, 96)], "vocab": [(0, 33), (33, 66), (66, 99), (99, 132)]},
}
MQA_SLICES = {
    2: {"q": [(0, 16), (16, 32)], "kv": [(0, 8), (0, 8)], "inner": [(0, 32), (32, 64)], "vocab": [(0, 50), (50, 100)]},
    4: {"q": [(0, 8), (8, 16), (16, 24), (24, 32)], "kv": [(0, 8)] * 4, "inner": [(0, 16), (16, 32), (32, 48), (48, 64)],
        "vocab": [(0, 25), (25, 50), (50, 75), (75, 100)]},
}


@dataclass
class CountingContext(ParallelContext):
    """A ParallelContext whose all-reduce records the shapes it was given instead of talking to peers."""

    reduced: list[tuple[int, ...]] = field(default_factory=list)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        self.reduced.append(tuple(tensor.shape))
        return tensor


def meta_stage(config: ModelConfig, layers: range, first: bool = True, last: bool = True) -> CausalLM:
    with torch.device("meta"):
        return CausalLM(config, layers, first, last)


def shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def expected_table(config: ModelConfig, slices: dict[str, Any], r: int, layers: range, first: bool,
                   last: bool) -> dict[str, Shard]:
    """Column-parallel q/k/v, gate/up (and their biases), row-parallel o/down (their bias whole, on rank 0 only)."""
    q, kv, inner = slices["q"][r], slices["kv"][r], slices["inner"][r]
    table: dict[str, Shard] = {}
    for i in layers:
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            table[f"{attn}.{name}.weight"] = Shard(0, *rows)
            if config.qkv_bias:
                table[f"{attn}.{name}.bias"] = Shard(0, *rows)
        table[f"{attn}.o_proj.weight"] = Shard(1, *q)
        if config.o_bias:
            table[f"{attn}.o_proj.bias"] = Shard(0, 0, config.hidden_size, zero=r != 0)
        for name in ("gate_proj", "up_proj"):
            table[f"{mlp}.{name}.weight"] = Shard(0, *inner)
            if config.mlp_bias:
                table[f"{mlp}.{name}.bias"] = Shard(0, *inner)
        table[f"{mlp}.down_proj.weight"] = Shard(1, *inner)
        if config.mlp_bias:
            table[f"{mlp}.down_proj.bias"] = Shard(0, 0, config.hidden_size, zero=r != 0)
    if first:
        table["model.embed_tokens.weight"] = Shard(0, *slices["vocab"][r])
    if last:
        table["lm_head.weight"] = Shard(0, *slices["vocab"][r])
    return table


def test_tp1_cuts_nothing() -> None:
    model = meta_stage(GQA, range(2))
    before, modules = shapes(model), dict(model.named_modules())
    assert apply_tensor_parallel(model, ParallelContext()) == {}
    assert shapes(model) == before and dict(model.named_modules()) == modules


@pytest.mark.parametrize("tp", [2, 4])
def test_gqa_shard_table_all_biases_and_vocab_padding(tp: int) -> None:
    for r in range(tp):
        model = meta_stage(GQA, range(2))
        full = shapes(model)
        table = apply_tensor_parallel(model, ParallelContext(tp=tp, tp_rank=r))
        assert table == expected_table(GQA, GQA_SLICES[tp], r, range(2), True, True), f"tp={tp} rank {r}"
        vocab = GQA_SLICES[tp]["vocab"][r]
        assert vocab[1] - vocab[0] == -(-131 // tp) and GQA_SLICES[tp]["vocab"][-1][1] > 131  # padded rows
        cut = shapes(model)
        assert set(cut) == set(full)  # same parameter names: the table names checkpoint tensors
        for name, shape in cut.items():
            shard = table.get(name)
            if shard is None:  # norms are replicated
                assert name.endswith("layernorm.weight") or name == "model.norm.weight", name
                assert shape == full[name]
            else:  # dim `shard.dim` is cut to stop - start (row biases: the whole bias), the other kept
                want = list(full[name])
                want[shard.dim] = shard.stop - shard.start
                assert shape == tuple(want), name
        q, inner, rows = 64 // tp, 96 // tp, -(-131 // tp)
        attn, mlp = "model.layers.1.self_attn", "model.layers.0.mlp"
        assert (cut[f"{attn}.q_proj.weight"], cut[f"{attn}.k_proj.weight"], cut[f"{attn}.v_proj.bias"],
                cut[f"{attn}.o_proj.weight"], cut[f"{attn}.o_proj.bias"]) == ((q, 64), (8, 64), (8,), (64, q), (64,))
        assert (cut[f"{mlp}.gate_proj.weight"], cut[f"{mlp}.up_proj.bias"], cut[f"{mlp}.down_proj.weight"],
                cut[f"{mlp}.down_proj.bias"]) == ((inner, 64), (inner,), (64, inner), (64,))
        assert cut["model.embed_tokens.weight"] == cut["lm_head.weight"] == (rows, 64)
        layer = model.model.layers["1"].self_attn
        assert (layer.n_heads, layer.n_kv_heads) == (8 // tp, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_mqa_qwen2_stages_replicate_the_kv_head(tp: int) -> None:
    """Pipeline stages keep global layer names; only stage 0 has the embedding, only the last the LM head."""
    for first, last, layers in ((True, False, range(0, 1)), (False, True, range(1, 2)), (True, True, range(2))):
        for r in range(tp):
            model = meta_stage(MQA, layers, first, last)
            table = apply_tensor_parallel(model, ParallelContext(tp=tp, tp_rank=r))
            assert table == expected_table(MQA, MQA_SLICES[tp], r, layers, first, last), (first, last, r)
            assert "model.layers.0.self_attn.o_proj.bias" not in table  # Qwen2: no o_proj bias
            cut = shapes(model)
            prefix = f"model.layers.{layers[0]}.self_attn"
            assert (cut[f"{prefix}.k_proj.weight"], cut[f"{prefix}.k_proj.bias"]) == ((8, 32), (8,))
            assert cut[f"{prefix}.q_proj.weight"] == (32 // tp, 32)
            assert ("model.embed_tokens.weight" in cut, "lm_head.weight" in cut) == (first, last)
            layer = model.model.layers[str(layers[0])].self_attn
            assert (layer.n_heads, layer.n_kv_heads) == (4 // tp, 1)


def test_only_row_parallel_projections_all_reduce() -> None:
    """One all-reduce after o_proj and down_proj (gpt-fast's tp.py); column-parallel outputs stay local."""
    ctx = CountingContext(tp=2, tp_rank=1)
    model = meta_stage(GQA, range(1))
    apply_tensor_parallel(model, ctx)
    layer = model.model.layers["0"]
    x = torch.empty(3, 1, 64, device="meta")
    layer.self_attn.q_proj(x)
    layer.mlp.gate_proj(x)
    assert ctx.reduced == []
    layer.self_attn.o_proj(torch.empty(3, 1, 32, device="meta"))
    layer.mlp.down_proj(torch.empty(3, 1, 48, device="meta"))
    assert ctx.reduced == [(3, 1, 64), (3, 1, 64)]
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding) and model.model.embed_tokens.start == 66
    assert isinstance(model.lm_head, VocabParallelLMHead) and model.lm_head.vocab == 131


def test_vocab_parallel_embedding_zeroes_tokens_of_other_ranks() -> None:
    """Rank 1 of 2 over vocab 131 holds rows 66..131 (row 65 of it is padding); other tokens give zeros."""
    ctx = CountingContext(tp=2, tp_rank=1)
    embed = VocabParallelEmbedding(66, 2, 66, ctx)
    embed.weight = torch.nn.Parameter(torch.arange(132.0).view(66, 2))
    out = embed(torch.tensor([[0, 65, 66, 130]]))
    assert out.tolist() == [[[0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [128.0, 129.0]]] and ctx.reduced == [(1, 4, 2)]


REFUSALS = [
    # heads 6, KV heads 2, inner 90: valid tp 1, 2, 6 (tp 3 neither divides nor multiplies the KV heads).
    (dict(num_attention_heads=6, num_key_value_heads=2, intermediate_size=90), 4,
     "tensor=4 does not divide numAttentionHeads=6; valid tp: 1, 2, 6"),
    (dict(num_attention_heads=6, num_key_value_heads=2, intermediate_size=90), 3,
     "tensor=3 does not divide numKeyValueHeads=2 (the native engine replicates KV heads only when tensor is "
     "a multiple of them); valid tp: 1, 2, 6"),
    (dict(num_attention_heads=8, num_key_value_heads=8, intermediate_size=90), 4,
     "tensor=4 does not divide intermediateSize=90; valid tp: 1, 2"),
    (dict(num_attention_heads=12, num_key_value_heads=3, intermediate_size=96), 2,
     "tensor=2 does not divide numKeyValueHeads=3 (the native engine replicates KV heads only when tensor is "
     "a multiple of them); valid tp: 1, 3, 6, 12"),
    (dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=64), 0,
     "tensor=0 must be at least 1; valid tp: 1, 2, 4"),
]


@pytest.mark.parametrize("shape, tp, message", REFUSALS)
def test_refused_tp_raises_before_touching_the_model(shape: dict[str, int], tp: int, message: str) -> None:
    config = ModelConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, **shape)
    model = meta_stage(config, range(1))
    before, modules = shapes(model), dict(model.named_modules())
    with pytest.raises(TensorParallelError) as err:
        apply_tensor_parallel(model, ParallelContext(tp=tp, tp_rank=0))
    assert str(err.value) == message
    assert shapes(model) == before and dict(model.named_modules()) == modules
    assert tp not in valid_tp_sizes(config) and 1 in valid_tp_sizes(config)
