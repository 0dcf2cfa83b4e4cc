"""The planner admits exactly the layouts the runtime can run: a sweep over shapes, tp, pp and engines.

For the native engine the runtime's verdict is independent of the shared rule: its TP transformation
runs with the rule switched off on every rank of a meta-device model, and the layout counts as
runnable only if the shards it produces tile every tensor exactly and each rank holds the KV heads its
query heads read. For DeepSpeed the verdict is what `load_autotp` refuses before it loads anything.
"""

from __future__ import annotations

import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from largemodel import modelfacts  # noqa: E402
from largemodel.operator import api  # noqa: E402
from largemodel.operator.planner import PlanError, plan_parallelism  # noqa: E402
from largemodel.partition import stage_layer_range  # noqa: E402
from largemodel.runtime import parallel  # noqa: E402
from largemodel.runtime.model import CausalLM, ModelConfig  # noqa: E402

HEAD_DIM = 4
LAYERS = 3
SHAPES = [  # (heads, kv heads, intermediate)
    (8, 8, 64), (8, 2, 64), (8, 1, 48), (12, 4, 96), (12, 3, 100), (6, 2, 36), (8, 4, 14338 // 2),
]


def planner_admits(heads: int, kv: int, inter: int, tp: int, pp: int, engine: str, quantization: str = "none",
                   head_dim: int = HEAD_DIM) -> bool:
    arch = {"numAttentionHeads": heads, "numKeyValueHeads": kv, "numHiddenLayers": LAYERS, "hiddenSize": heads * head_dim,
            "intermediateSize": inter, "vocabSize": 50}
    spec = api.LargeModelSpec.model_validate({
        "model": {"uri": "pvc://m/m", "dtype": "float32", "architecture": arch, "quantization": quantization},
        "engine": engine,
        "parallelism": {"tensor": tp, "pipeline": pp, "microBatches": 4 * pp},
        "gpu": {"perNode": 8, "memoryGiB": 1000}, "serving": {"maxBatchSize": 4, "maxModelLen": 64}})
    try:
        plan_parallelism(spec)
    except PlanError:
        return False
    return True


def _covers(ranges: list[tuple[int, int]], size: int) -> bool:
    return sorted(ranges) == [(i * size // len(ranges), (i + 1) * size // len(ranges)) for i in range(len(ranges))] \
        and all(b > a for a, b in ranges)


def native_runs(heads: int, kv: int, inter: int, tp: int, pp: int, monkeypatch: pytest.MonkeyPatch,
                block: int = 1, head_dim: int = HEAD_DIM) -> bool:
    """Build every stage and every TP rank's shard without the shared rule; True when the result is sound.

    With a quantization `block` (weights per block along a row) every row must be whole blocks and every
    row-parallel shard (o_proj, down_proj: the input dimension) must start and stop on a block boundary."""
    config = ModelConfig(vocab_size=50, hidden_size=heads * head_dim, intermediate_size=inter, num_hidden_layers=LAYERS,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    if any(width % block for width in (heads * head_dim, inter)):
        return False
    try:
        stages = [stage_layer_range(LAYERS, pp, s, config.head_layers) for s in range(pp)]
    except ValueError:
        return False
    if any(len(r) == 0 for r in stages):
        return False
    monkeypatch.setattr(parallel, "check_tensor_parallel", lambda config, tp: None)
    try:
        q_ranges, inner_ranges = [], []
        for rank in range(tp):
            with torch.device("meta"):
                model = CausalLM(config, stages[0], first=True, last=pp == 1)
            shards = parallel.apply_tensor_parallel(model, parallel.ParallelContext(tp=tp, pp=pp, tp_rank=rank))
            if tp == 1:
                return True
            rows = [shards[f"model.layers.0.{name}.weight"] for name in ("self_attn.o_proj", "mlp.down_proj")]
            if any(shard.start % block or shard.stop % block for shard in rows):
                return False
            q = shards["model.layers.0.self_attn.q_proj.weight"]
            k = shards["model.layers.0.self_attn.k_proj.weight"]
            q_ranges.append((q.start, q.stop))
            inner_ranges.append((shards["model.layers.0.mlp.gate_proj.weight"].start,
                                 shards["model.layers.0.mlp.gate_proj.weight"].stop))
            # GQA: query head h reads KV head h // (heads // kv); this rank must hold all it reads.
            read = {h // (heads // kv) for h in range(q.start // head_dim, q.stop // head_dim)}
            held = set(range(k.start // head_dim, k.stop // head_dim))
            if not read or not read <= held or k.stop > kv * head_dim:
                return False
    finally:
        monkeypatch.undo()
    return _covers(q_ranges, heads * head_dim) and _covers(inner_ranges, inter)


def deepspeed_runs(heads: int, kv: int, inter: int, tp: int, pp: int, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> bool:
    """True when load_autotp gets past its own checks (to `import deepspeed`, replaced by a sentinel)."""
    from largemodel.runtime import deepspeed_engine

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 50,
              "hidden_size": heads * HEAD_DIM, "intermediate_size": inter, "num_hidden_layers": LAYERS,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": HEAD_DIM}
    (tmp_path / "config.json").write_text(json.dumps(config))

    class Reached(Exception):
        pass

    sentinel = types.ModuleType("deepspeed")
    sentinel.__getattr__ = lambda name: (_ for _ in ()).throw(Reached())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deepspeed", sentinel)
    try:
        deepspeed_engine.load_autotp(tmp_path, parallel.ParallelContext(tp=tp, pp=pp), torch.float32, 1, 8)
    except Reached:
        return True
    except (deepspeed_engine.DeepSpeedConfigError, parallel.TensorParallelError):
        return False
    finally:
        monkeypatch.undo()
    raise AssertionError("load_autotp neither refused nor reached deepspeed")


def test_native_engine_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    disagree: list[Any] = []
    for (heads, kv, inter), tp, pp in itertools.product(SHAPES, range(1, 9), range(1, 5)):
        admitted, runs = planner_admits(heads, kv, inter, tp, pp, "native"), native_runs(heads, kv, inter, tp, pp,
                                                                                             monkeypatch)
        if admitted != runs:
            disagree.append((heads, kv, inter, tp, pp, admitted, runs))
    assert not disagree, f"planner vs runtime (heads, kv, inter, tp, pp, admitted, runs): {disagree[:10]}"


def test_deepspeed_engine_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disagree: list[Any] = []
    for (heads, kv, inter), tp, pp in itertools.product(SHAPES, range(1, 9), range(1, 4)):
        admitted = planner_admits(heads, kv, inter, tp, pp, "deepspeed")
        runs = deepspeed_runs(heads, kv, inter, tp, pp, tmp_path, monkeypatch)
        if admitted != runs:
            disagree.append((heads, kv, inter, tp, pp, admitted, runs))
    assert not disagree, f"planner vs load_autotp (heads, kv, inter, tp, pp, admitted, runs): {disagree[:10]}"


Q4_HEAD_DIM = 16
Q4_SHAPES = [(8, 8, 64), (8, 2, 64), (12, 4, 96), (6, 2, 192), (8, 4, 1376), (10, 2, 160)]


@pytest.mark.parametrize("quantization", ["int8", "q4"])
def test_native_engine_sweep_quantized(quantization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """q4's 32-weight blocks: the planner admits a tp exactly when the row-parallel shards land on blocks."""
    block = modelfacts.quantization_block(quantization)
    disagree: list[Any] = []
    for (heads, kv, inter), tp, pp in itertools.product(Q4_SHAPES, range(1, 9), range(1, 3)):
        admitted = planner_admits(heads, kv, inter, tp, pp, "native", quantization, Q4_HEAD_DIM)
        runs = native_runs(heads, kv, inter, tp, pp, monkeypatch, block, Q4_HEAD_DIM)
        if admitted != runs:
            disagree.append((heads, kv, inter, tp, pp, admitted, runs))
    assert not disagree, f"planner vs runtime (heads, kv, inter, tp, pp, admitted, runs): {disagree[:10]}"
    # The sweep reaches the block rule: some tp that divides everything still splits a q4 block.
    assert quantization == "int8" or not planner_admits(8, 4, 1376, 2, 1, "native", "q4", Q4_HEAD_DIM)
    assert planner_admits(8, 4, 1376, 2, 1, "native", "none", Q4_HEAD_DIM)


def test_the_issue_cases() -> None:
    """intermediateSize 14338 at tp 4, DeepSpeed with two stages, DeepSpeed under auto."""
    assert modelfacts.tensor_problem(heads=32, kv_heads=8, intermediate=14338, tp=4) == \
        "tensor=4 does not divide intermediateSize=14338"
    with pytest.raises(PlanError, match="does not divide intermediateSize=14338; valid tensor sizes: 1, 2$"):
        plan_parallelism(_llama(intermediate=14338, tensor=4, pipeline=1))
    with pytest.raises(PlanError, match="engine=deepspeed: DeepSpeed runs tensor parallel only"):
        plan_parallelism(_llama(engine="deepspeed", tensor=8, pipeline=2))
    # auto under DeepSpeed only ever considers one stage: 70B bf16 fits tp8 x pp1 on 8x80 GB
    auto = plan_parallelism(_llama(engine="deepspeed", tensor="auto", pipeline="auto"))
    assert auto.pp == 1
    # and where one stage cannot hold the model, DeepSpeed says no instead of picking two stages
    with pytest.raises(PlanError):
        plan_parallelism(_llama(engine="deepspeed", tensor="auto", pipeline="auto", memory=20))
    assert plan_parallelism(_llama(tensor="auto", pipeline="auto", memory=20)).pp > 1


def _llama(intermediate: int = 28672, engine: str = "native", tensor: Any = "auto", pipeline: Any = "auto",
           memory: float = 80) -> api.LargeModelSpec:
    arch = {"numAttentionHeads": 64, "numKeyValueHeads": 8, "numHiddenLayers": 80, "hiddenSize": 8192,
            "intermediateSize": intermediate, "vocabSize": 128256, "parameters": 70553706496}
    return api.LargeModelSpec.model_validate({
        "model": {"uri": "pvc://m/m", "dtype": "bfloat16", "architecture": arch}, "engine": engine,
        "parallelism": {"tensor": tensor, "pipeline": pipeline, "microBatches": 8},
        "gpu": {"perNode": 8, "memoryGiB": memory}, "serving": {"maxBatchSize": 8, "maxModelLen": 4096}})
