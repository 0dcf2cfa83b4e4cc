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
    assert plan_parallelism(lm.spec).warnings == ()
