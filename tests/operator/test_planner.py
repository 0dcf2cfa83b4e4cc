"""Table tests of the planner: docs/DESIGN.md#planning's worked examples, memory fit, auto, and rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from largemodel.operator import api
from largemodel.operator.planner import (
    GIB,
    MEMORY_UTILIZATION,
    OVERHEAD_GIB,
    PlanError,
    plan_parallelism,
    resolve_architecture,
    valid_tensor_sizes,
)
from largemodel.partition import split_layers
from tests.support.examples import LLAMA3_70B, LLAMA31_405B
from tests.support.paths import REPO


def spec(arch: dict[str, Any] | None = LLAMA3_70B, **overrides: Any) -> api.LargeModelSpec:
    """A spec on 8x80 GB nodes with the given architecture and overrides (camelCase dicts)."""
    body: dict[str, Any] = {"model": {"uri": "pvc://models/m", "dtype": "bfloat16"}, "gpu": {"perNode": 8, "memoryGiB": 80}}
    if arch is not None:
        body["model"]["architecture"] = arch
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return api.LargeModelSpec.model_validate(body)


def test_70b_fp16_is_140gb_and_cannot_fit_one_80gb_gpu() -> None:
    s = spec(model={"uri": "pvc://models/m", "dtype": "float16", "architecture": LLAMA3_70B},
             parallelism={"tensor": 1, "pipeline": 1})
    assert LLAMA3_70B["parameters"] * 2 / 1e9 == pytest.approx(141, abs=1)
    with pytest.raises(PlanError) as err:
        plan_parallelism(s)
    message = str(err.value)
    assert "tensor=1 pipeline=1 does not fit" in message
    assert "weights 131.4" in message  # 141 GB = 131.4 GiB
    assert "72.0 GiB usable (gpu.memoryGiB=80 x 0.9)" in message
    # The error lists what does fit, per valid tensor size.
    assert "tensor=8 pipeline>=1" in message


def test_llama3_70b_admits_tensor_1_2_4_8() -> None:
    assert valid_tensor_sizes(spec(), api.Architecture.model_validate(LLAMA3_70B)) == [1, 2, 4, 8]


def test_405b_bf16_on_two_nodes_of_8x80gb_is_tp8_pp2() -> None:
    s = spec(LLAMA31_405B, parallelism={"tensor": 8, "pipeline": "auto", "microBatches": 8})
    plan = plan_parallelism(s)
    assert (plan.tp, plan.pp, plan.gpus_per_group) == (8, 2, 16)
    assert plan.layers_per_stage == (63, 63)
    # Even split: per-GPU weights are exactly M/(tp*pp).
    assert plan.weight_gib_per_gpu == pytest.approx(LLAMA31_405B["parameters"] * 2 / 16 / GIB)
    assert [(r.tp, r.pp) for r in plan.rejected] == [(8, 1)]
    assert "needs 128.0 GiB per GPU" in plan.rejected[0].why


def test_405b_auto_picks_fewest_nodes_then_fewest_stages_and_explains() -> None:
    plan = plan_parallelism(spec(LLAMA31_405B, parallelism={"microBatches": 8}))
    # tp4 x pp3 would use fewer GPUs (12) but also two nodes, with half of one stranded and half the
    # per-token bandwidth of tp8: fewest nodes, then fewest stages, picks tp8 x pp2.
    assert (plan.tp, plan.pp) == (8, 2)
    why = {r.tp: r for r in plan.rejected}
    # Divisibility rejections hold for any pipeline; memory rejections name the nearest miss.
    assert why[3].why == "tensor=3 does not divide numAttentionHeads=128 (any pipeline)"
    assert why[8].pp == 1 and "> 72.0 GiB usable" in why[8].why
    # Every one-node layout was tried first: tp1 up to 8 stages, tp2 up to 4, tp4 up to 2.
    assert (why[1].pp, why[2].pp, why[4].pp) == (8, 4, 2)
    assert plan.total_gpus == 16 and plan.warnings == ()


def test_70b_fp16_auto_fills_a_node_with_tp_before_adding_stages() -> None:
    """Practitioners run 70B fp16 on 8x80 GB as tp4 x pp1, not the 3-GPU tp1 x pp3 of "fewest GPUs"."""
    fp16 = {"uri": "pvc://models/m", "dtype": "float16", "architecture": LLAMA3_70B}
    plan = plan_parallelism(spec(model=fp16, serving={"maxBatchSize": 8, "maxModelLen": 4096}))
    assert (plan.tp, plan.pp) == (4, 1)
    assert {(r.tp, r.pp) for r in plan.rejected if "needs" in r.why} == {(1, 1), (2, 1)}
    # where tp2 fits (a smaller KV cache and 141 GB GPUs), it wins: fewer GPUs, still one stage
    roomy = plan_parallelism(spec(model=fp16, gpu={"perNode": 8, "memoryGiB": 141},
                                  serving={"maxBatchSize": 8, "maxModelLen": 4096}))
    assert (roomy.tp, roomy.pp) == (2, 1)


@pytest.mark.parametrize(("per_node", "tp", "pp", "nodes"), [(8, 8, 2, 2), (8, 4, 2, 1), (8, 4, 3, 2), (8, 1, 8, 1),
                                                           (8, 3, 3, 2), (4, 4, 1, 1)])
def test_nodes_per_group(per_node: int, tp: int, pp: int, nodes: int) -> None:
    from largemodel.operator.planner import nodes_per_group

    assert nodes_per_group(spec(gpu={"perNode": per_node, "memoryGiB": 80}), tp, pp) == nodes


@pytest.mark.parametrize(
    ("parallelism", "gpu", "expected"),
    [
        ({"tensor": 16, "pipeline": 1}, {}, "tensor=16 exceeds gpu.perNode=8 (tensor parallelism never crosses a node); valid tensor sizes: 1, 2, 4, 8"),
        ({"tensor": 3, "pipeline": 4}, {}, "tensor=3 does not divide numAttentionHeads=64; valid tensor sizes: 1, 2, 4, 8"),
        ({"tensor": 12, "pipeline": 1}, {"perNode": 16}, "tensor=12 does not divide numAttentionHeads=64; valid tensor sizes: 1, 2, 4, 8, 16"),
        ({"tensor": 8, "pipeline": 81}, {}, "pipeline=81 exceeds numHiddenLayers=80 (every stage needs a layer); valid pipeline sizes: 1..80"),
    ],
)
def test_invalid_layouts_are_rejected_with_the_valid_choices(
    parallelism: dict[str, Any], gpu: dict[str, Any], expected: str
) -> None:
    with pytest.raises(PlanError) as err:
        plan_parallelism(spec(parallelism=parallelism, gpu=gpu))
    assert str(err.value) == expected


def test_memory_rejection_lists_the_layouts_that_fit() -> None:
    s = spec(parallelism={"tensor": 2, "pipeline": 1}, gpu={"memoryGiB": 40})
    with pytest.raises(PlanError) as err:
        plan_parallelism(s)
    message = str(err.value)
    assert message.startswith("tensor=2 pipeline=1 does not fit: needs ")
    assert "36.0 GiB usable (gpu.memoryGiB=40 x 0.9)" in message
    # Each valid tp with the smallest pipeline that fits it.
    for choice in ("tensor=1 pipeline>=", "tensor=2 pipeline>=", "tensor=4 pipeline>=", "tensor=8 pipeline>="):
        assert choice in message


def test_nothing_fits_says_so() -> None:
    tiny_gpu = spec(gpu={"memoryGiB": 2.5})
    with pytest.raises(PlanError, match="no layout fits"):
        plan_parallelism(tiny_gpu)


@pytest.mark.parametrize(
    ("tp", "pp", "mb", "batch", "length", "layers"),
    # Llama-3-70B's LM head weighs 1.23 layers: at pp=2 and pp=5 the last stage gives one layer up.
    [(8, 1, 4, 64, 8192, (80,)), (4, 2, 8, 32, 4096, (41, 39)), (2, 3, 12, 16, 8192, (27, 27, 26)),
     (1, 5, 20, 64, 8192, (17, 16, 16, 16, 15))],
)
def test_memory_per_gpu_is_weights_plus_sharded_kv_of_the_largest_stage(
    tp: int, pp: int, mb: int, batch: int, length: int, layers: tuple[int, ...]
) -> None:
    s = spec(parallelism={"tensor": tp, "pipeline": pp, "microBatches": mb},
             serving={"maxBatchSize": batch, "maxModelLen": length})
    plan = plan_parallelism(s)
    assert plan.layers_per_stage == layers == tuple(split_layers(80, pp, 1.2279411764705883))
    stage = max(layers)
    assert plan.weight_gib_per_gpu == pytest.approx(LLAMA3_70B["parameters"] * 2 * stage / 80 / tp / GIB)
    # K and V, 8 KV heads sharded by tp, head_dim 128, bf16.
    kv_bytes = 2 * (8 // tp) * 128 * 2 * stage * batch * length
    assert plan.kv_cache_gib_per_gpu == pytest.approx(kv_bytes / GIB)
    assert plan.gib_per_gpu == pytest.approx(plan.weight_gib_per_gpu + plan.kv_cache_gib_per_gpu + OVERHEAD_GIB)
    assert plan.gib_per_gpu <= 80 * MEMORY_UTILIZATION
    assert plan.bubble == pytest.approx((pp - 1) / mb)
    assert plan.gpus_per_group == tp * pp


@pytest.mark.parametrize(
    ("pp", "mb", "warns"),
    [(1, 1, False), (2, 4, True), (2, 8, False), (4, 15, True), (4, 16, False)],
)
def test_warns_when_micro_batches_below_4_times_pp(pp: int, mb: int, warns: bool) -> None:
    plan = plan_parallelism(spec(parallelism={"tensor": 8, "pipeline": pp, "microBatches": mb}))
    bubble_warnings = [w for w in plan.warnings if "4*pipeline" in w]
    assert bool(bubble_warnings) is warns
    if warns:
        assert bubble_warnings[0].startswith(f"microBatches={mb} < 4*pipeline={4 * pp}")


def test_micro_batches_above_max_batch_size_warn() -> None:
    plan = plan_parallelism(spec(parallelism={"tensor": 8, "pipeline": 2, "microBatches": 16}, serving={"maxBatchSize": 8}))
    assert any("some micro-batches will always be empty" in w for w in plan.warnings)


def test_replicas_multiply_groups_not_group_size() -> None:
    plan = plan_parallelism(spec(parallelism={"tensor": 4, "pipeline": 2, "microBatches": 8}, replicas=3))
    assert (plan.gpus_per_group, plan.replicas, plan.total_gpus) == (8, 3, 24)


def test_auto_pipeline_with_fixed_tensor_takes_the_smallest_pipeline_that_fits() -> None:
    plan = plan_parallelism(spec(parallelism={"tensor": 2, "pipeline": "auto"}))
    assert plan.tp == 2
    for pp in range(1, plan.pp):
        assert any(r.tp == 2 and r.pp >= pp for r in plan.rejected)
    assert (plan.tp, plan.pp) == (2, 3)


def test_auto_tensor_with_fixed_pipeline() -> None:
    plan = plan_parallelism(spec(parallelism={"tensor": "auto", "pipeline": 2}))
    # tp 1 and 2 with two stages hold 65.7 and 32.9 GiB of weights plus 80 and 40 GiB of KV cache.
    assert (plan.tp, plan.pp) == (4, 2)
    assert [(r.tp, r.pp) for r in plan.rejected if "needs" in r.why] == [(1, 2), (2, 2)]


def test_to_status_is_the_status_plan_block() -> None:
    plan = plan_parallelism(spec(LLAMA31_405B, parallelism={"microBatches": 8}))
    status = plan.to_status().model_dump(by_alias=True)
    assert status["tensor"] == 8 and status["pipeline"] == 2 and status["gpusPerGroup"] == 16
    assert status["layersPerStage"] == [63, 63] and status["bubble"] == 0.125
    assert {k: status["rejected"][-1][k] for k in ("tensor", "pipeline")} == {"tensor": 8, "pipeline": 1}
    api.LargeModelStatus.model_validate({"plan": status})


def test_architecture_is_read_from_config_json_for_file_uris(tmp_path: Path) -> None:
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        "vocab_size": 49152, "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    s = spec(None, model={"uri": f"file://{tmp_path}", "dtype": "float32"}, parallelism={"tensor": 3, "pipeline": 2},
             gpu={"perNode": 4, "memoryGiB": 8}, serving={"maxBatchSize": 4, "maxModelLen": 1024})
    arch = resolve_architecture(s)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.parameters) == (9, 3, 134515008)
    # SmolLM2-135M's tied 49152 x 576 head weighs as much as 8 of its layers: it gets a stage of 11 layers.
    assert plan_parallelism(s).layers_per_stage == (19, 11)
    with pytest.raises(PlanError, match="numAttentionHeads=9; valid tensor sizes: 1, 3"):
        plan_parallelism(s.model_copy(update={"parallelism": api.Parallelism(tensor=2, pipeline=1)}))


def test_architecture_is_required_for_pvc_and_hf_uris() -> None:
    with pytest.raises(PlanError, match=r"spec.model.architecture is required for pvc://models/m .*largemodel inspect"):
        plan_parallelism(spec(None))


def test_file_uri_without_config_json_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="config.json: no such file"):
        plan_parallelism(spec(None, model={"uri": f"file://{tmp_path}"}))


def test_s3_uri_passes_the_schema_but_not_the_planner() -> None:
    with pytest.raises(PlanError, match=r"scheme s3:// is not supported yet .*use pvc://, file://, hf://"):
        plan_parallelism(spec(model={"uri": "s3://bucket/m", "architecture": LLAMA3_70B}))


def test_parameters_absent_are_computed_from_the_shapes_as_inspect_does() -> None:
    """No `parameters`: the planner counts them from the shapes (what `largemodel inspect` prints for a
    bias-free Llama config) and status.plan says which count it used and where it came from."""
    from largemodel.operator.modelconfig import HFConfig, parameter_count

    shapes = {k: v for k, v in LLAMA3_70B.items() if k != "parameters"}
    computed = plan_parallelism(spec(shapes, parallelism={"tensor": 8, "pipeline": 1}))
    given = plan_parallelism(spec(LLAMA3_70B, parallelism={"tensor": 8, "pipeline": 1}))
    cfg = HFConfig(num_attention_heads=shapes["numAttentionHeads"], num_key_value_heads=shapes["numKeyValueHeads"],
                   num_hidden_layers=shapes["numHiddenLayers"], hidden_size=shapes["hiddenSize"],
                   intermediate_size=shapes["intermediateSize"], vocab_size=shapes["vocabSize"],
                   tie_word_embeddings=bool(shapes.get("tieWordEmbeddings", False)))
    assert computed.parameters == parameter_count(cfg)
    assert computed.parameters == pytest.approx(LLAMA3_70B["parameters"], rel=1e-3)
    assert computed.weight_gib_per_gpu == pytest.approx(given.weight_gib_per_gpu, rel=1e-3)
    status = computed.to_status().model_dump(by_alias=True)
    assert (status["parameters"], status["parametersSource"]) == (parameter_count(cfg), "shapes")
    assert given.to_status().model_dump(by_alias=True)["parametersSource"] == "spec"


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_plan_without_warnings(example: Path) -> None:
    import yaml

    lm = api.LargeModel.model_validate(yaml.safe_load(example.read_text()))
    spec = lm.spec
    if spec.model.quantization == "gguf" and not spec.model.uri.startswith("file://"):
        # A gguf example is for `largemodel run`, which plans from the local file's header; the operator
        # reads file:// sources only and says so.
        from largemodel.runtime.modelstore import local_gguf_file

        (warning,) = plan_parallelism(spec).warnings
        assert warning.startswith(f"quantization=gguf: the planner cannot read {spec.model.uri}")
        local = local_gguf_file(spec.model.uri).resolve().as_uri()
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"uri": local})})
    assert plan_parallelism(spec).warnings == ()


# --- Quantized weights (issue 19) ------------------------------------------------------------------

# heads 16 x headDim 64 = 1024 and intermediateSize 1376 = 43 x 32: tp2 cuts down_proj's input into
# 688-weight halves, which a 32-weight q4 block cannot span.
BLOCKY = {"numAttentionHeads": 16, "numKeyValueHeads": 4, "numHiddenLayers": 4, "hiddenSize": 1024,
          "intermediateSize": 1376, "vocabSize": 32000}


@pytest.mark.parametrize(("quantization", "rows", "cols", "dtype_bytes", "expected"), [
    ("none", 4096, 4096, 2, 4096 * 4096 * 2),
    ("none", 4096, 4096, 4, 4096 * 4096 * 4),
    ("int8", 4096, 4096, 2, 4096 * 4096 + 4096 * 2),  # 1 byte a weight + a bf16 scale per output row
    ("int8", 4096, 4096, 4, 4096 * 4096 + 4096 * 4),  # the scale in the model dtype
    ("q4", 4096, 4096, 2, 4096 * 4096 * 20 // 32),  # Q4_1: 20 bytes per 32 weights = 0.625 B/weight
    ("q4", 4096, 4096, 4, 4096 * 4096 * 20 // 32),  # independent of the dtype
    ("gguf", 4096, 4096, 2, 4096 * 4096 * 34 // 32),  # unread file: Q8_0's 34 bytes per 32
])
def test_linear_bytes_per_quantization(quantization: str, rows: int, cols: int, dtype_bytes: int,
                                       expected: int) -> None:
    from largemodel import modelfacts

    assert modelfacts.linear_bytes(quantization, rows, cols, dtype_bytes) == expected


def test_only_the_linears_are_quantized() -> None:
    """Embedding, LM head and norms stay in dtype: q4 weight bytes = linears x 0.625 + the rest x 2."""
    from largemodel import modelfacts

    arch = api.Architecture.model_validate(LLAMA3_70B)
    shapes = modelfacts.linear_shapes(hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128)
    linears = 80 * sum(r * c for r, c in shapes)
    rest = LLAMA3_70B["parameters"] - linears
    assert rest == 2 * 128256 * 8192 + (2 * 80 + 1) * 8192  # embedding, head, norms
    q4 = plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "q4", "architecture": LLAMA3_70B},
                               parallelism={"tensor": 8, "pipeline": 1}))
    assert q4.weight_bytes_per_param * arch.parameter_total == pytest.approx(linears * 0.625 + rest * 2)
    assert q4.weight_gib_per_gpu == pytest.approx((linears * 0.625 + rest * 2) / 8 / GIB)


def test_405b_int8_fits_one_node_at_tp8_pp1_where_bf16_needs_two() -> None:
    serving = {"maxBatchSize": 32, "maxModelLen": 8192}
    bf16 = plan_parallelism(spec(LLAMA31_405B, parallelism={"microBatches": 8}, serving=serving))
    int8 = plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "int8", "architecture": LLAMA31_405B},
                                 parallelism={"microBatches": 8}, serving=serving))
    assert (bf16.tp, bf16.pp) == (8, 2) and (int8.tp, int8.pp) == (8, 1)
    assert int8.weight_gib_per_gpu == pytest.approx(47.74, abs=0.01)
    assert int8.weight_bytes_per_param == pytest.approx(1.0105, abs=1e-4)  # 1 byte + scales, head in bf16
    status = int8.to_status().model_dump(by_alias=True)
    assert (status["quantization"], status["weightBytesPerParam"]) == ("int8", 1.0105)
    assert bf16.to_status().model_dump(by_alias=True)["weightBytesPerParam"] == 2.0
    # The smaller layouts lost on memory, and say so.
    why = {r.tp: r.why for r in int8.rejected}
    assert why[4].startswith("needs 129.0 GiB per GPU (weights 95.5 + KV cache 31.5")
    assert why[3] == "tensor=3 does not divide numAttentionHeads=128 (any pipeline)"


def test_405b_int8_with_the_full_kv_cache_of_64_x_8192_stays_tp8_pp2() -> None:
    plan = plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "int8", "architecture": LLAMA31_405B},
                                 parallelism={"microBatches": 8}))
    assert (plan.tp, plan.pp) == (8, 2)
    why = {r.tp: r for r in plan.rejected}
    assert why[8].pp == 1 and why[8].why.startswith("needs 81.2 GiB per GPU (weights 47.7 + KV cache 31.5")


@pytest.mark.parametrize(("quantization", "valid"), [("none", [1, 2, 4, 8]), ("int8", [1, 2, 4, 8]), ("q4", [1])])
def test_a_tp_that_splits_a_quantization_block_is_rejected(quantization: str, valid: list[int]) -> None:
    s = spec(model={"uri": "pvc://m/m", "quantization": quantization, "architecture": BLOCKY})
    assert valid_tensor_sizes(s, api.Architecture.model_validate(BLOCKY)) == valid
    if quantization != "q4":
        return
    with pytest.raises(PlanError, match=r"^tensor=2 splits a q4 block of 32 weights: down_proj's input 1376 / "
                                        r"tensor=2 = 688 is not a multiple of 32; valid tensor sizes: 1$"):
        plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "q4", "architecture": BLOCKY},
                              parallelism={"tensor": 2, "pipeline": 1}))
    auto = plan_parallelism(s)
    assert auto.tp == 1
    assert [r.why for r in auto.rejected if r.tp == 2] == [
        "tensor=2 splits a q4 block of 32 weights: down_proj's input 1376 / tensor=2 = 688 is not a multiple "
        "of 32 (any pipeline)"]


def test_q4_needs_whole_blocks_in_every_row() -> None:
    odd = {**BLOCKY, "hiddenSize": 1000, "headDim": 64}
    with pytest.raises(PlanError, match="hiddenSize=1000 is not a multiple of the q4 block of 32 weights"):
        plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "q4", "architecture": odd},
                              parallelism={"tensor": 1, "pipeline": 1}))
    assert plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "int8", "architecture": odd},
                                 parallelism={"tensor": 1, "pipeline": 1})).tp == 1


def test_quantization_is_refused_with_deepspeed_and_gguf_needs_a_gguf_file() -> None:
    with pytest.raises(ValueError, match="quantization=int8 with engine=deepspeed: DeepSpeed AutoTP"):
        spec(model={"uri": "pvc://m/m", "quantization": "int8", "architecture": LLAMA3_70B}, engine="deepspeed")
    with pytest.raises(ValueError, match="quantization=gguf serves a GGUF file's own tensors: model.uri must name"):
        spec(model={"uri": "pvc://m/m", "quantization": "gguf", "architecture": LLAMA3_70B})
    assert spec(model={"uri": "pvc://m/m", "quantization": "none"}, engine="deepspeed").engine == "deepspeed"


def test_gguf_from_a_file_plans_with_its_header_bytes_and_shapes() -> None:
    """file:// .gguf: architecture and weight bytes come from the header, checked against gguf's own reader."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (runtime extra) reads the file independently")
    from largemodel.runtime.modelstore import smollm2_gguf_path

    path = smollm2_gguf_path()
    s = spec(None, model={"uri": path.as_uri(), "quantization": "gguf", "dtype": "float32"},
             parallelism={"tensor": "auto", "pipeline": 1}, gpu={"perNode": 8, "memoryGiB": 4},
             serving={"maxBatchSize": 4, "maxModelLen": 256})
    plan = plan_parallelism(s)
    reader = gguf.GGUFReader(path)
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert plan.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert plan.weight_bytes_per_param * plan.parameters == pytest.approx(file_bytes)
    assert plan.weight_gib_per_gpu == pytest.approx(file_bytes / GIB)
    assert plan.quantization == "gguf" and plan.warnings == ()
    arch = resolve_architecture(s)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.hidden_size, arch.tie_word_embeddings) == \
        (9, 3, 576, True)
    # SmolLM2's 9 heads allow tp 1, 3, 9; 576/3 = 192 and 1536/3 = 512 are whole Q4_1 blocks.
    assert valid_tensor_sizes(s, arch) == [1, 3]


def test_gguf_the_operator_cannot_read_is_estimated_and_says_so() -> None:
    plan = plan_parallelism(spec(model={"uri": "pvc://m/llama3-70b.Q4_1.gguf", "quantization": "gguf",
                                        "architecture": LLAMA3_70B}, parallelism={"tensor": 8, "pipeline": 1}))
    q8 = plan_parallelism(spec(model={"uri": "pvc://m/m", "quantization": "int8", "architecture": LLAMA3_70B},
                               parallelism={"tensor": 8, "pipeline": 1}))
    assert 1.0 < q8.weight_bytes_per_param < plan.weight_bytes_per_param < 1.1  # Q8_0's 1.0625 on the linears
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("quantization=gguf: the planner cannot read")
