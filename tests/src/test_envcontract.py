"""The env contract: what RankGroupEnv writes, RankEnv reads back whole, with the API's defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from largemodel import envcontract
from largemodel.envcontract import EnvContractError, RankEnv, RankGroupEnv
from largemodel.operator import api

GROUP = RankGroupEnv(master_addr="m-g1-0.m-ranks.ns.svc", master_port=29500, tp=2, pp=3, group_index=1,
                     model_uri="pvc://models/m", model_dtype="bfloat16", micro_batches=12, engine="native",
                     http_port=8001, grpc_port=9001, metrics_port=9101, max_batch_size=16, max_queue=32,
                     max_model_len=4096, model_name="m", layers_per_stage=(11, 11, 8),
                     prefix_cache=False, kv_cache_blocks=1234, model_quantization="int8")


def test_rank_env_reads_back_everything_the_group_env_writes() -> None:
    env = RankEnv.from_environ(GROUP.node_env(2))
    group = dataclasses.asdict(GROUP)
    for field in dataclasses.fields(RankEnv):
        if field.name in group:
            assert getattr(env, field.name) == group[field.name], field.name
    assert (env.node_rank, env.nnodes, env.nproc_per_node, env.world_size) == (2, 3, 2, 6)
    assert env.liveness_port == 29500 + envcontract.LIVENESS_PORT_OFFSET
    # every variable written is one the reader knows
    known = {envcontract.NODE_RANK, envcontract.LWS_WORKER_INDEX, envcontract.LWS_LEADER_ADDRESS,
             envcontract.LWS_GROUP_SIZE}
    assert set(GROUP.node_env(0)) - known == {
        getattr(envcontract, name) for name in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE", "WORLD_SIZE",
                                                "TP_SIZE", "PP_SIZE", "GROUP_INDEX", "MODEL_URI", "MODEL_DTYPE",
                                                "MICRO_BATCHES", "ENGINE", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT",
                                                "MAX_BATCH_SIZE", "MAX_QUEUE", "MAX_MODEL_LEN", "MODEL_NAME",
                                                "LAYERS_PER_STAGE", "PREFIX_CACHE", "KV_CACHE_BLOCKS",
                                                "MODEL_QUANTIZATION")}


def test_one_set_of_defaults_the_apis() -> None:
    minimal = {k: v for k, v in GROUP.node_env(0).items()
               if k in (envcontract.MASTER_ADDR, envcontract.MASTER_PORT, envcontract.NNODES, envcontract.NODE_RANK,
                        envcontract.NPROC_PER_NODE, envcontract.WORLD_SIZE, envcontract.TP_SIZE, envcontract.PP_SIZE,
                        envcontract.MODEL_URI)}
    env = RankEnv.from_environ(minimal)
    serving = api.Serving()
    assert (env.http_port, env.grpc_port, env.metrics_port, env.max_batch_size, env.max_queue, env.max_model_len) == (
        serving.http_port, serving.grpc_port, serving.metrics_port, serving.max_batch_size, serving.max_queue,
        serving.max_model_len)
    assert env.layers_per_stage == () and env.group_index == 0 and env.micro_batches == 1
    # The prefix cache is on unless the operator says otherwise; 0 blocks: the runtime derives them.
    assert env.prefix_cache is serving.prefix_cache is True and env.kv_cache_blocks == 0
    assert env.model_quantization == api.ModelSource(uri="pvc://m/m").quantization == "none"


def test_prefix_cache_flag_values() -> None:
    env = GROUP.node_env(0)
    assert env[envcontract.PREFIX_CACHE] == "0" and env[envcontract.KV_CACHE_BLOCKS] == "1234"
    assert RankEnv.from_environ({**env, envcontract.PREFIX_CACHE: "1"}).prefix_cache is True
    assert RankEnv.from_environ({**env, envcontract.PREFIX_CACHE: "0"}).prefix_cache is False


def test_kv_cache_blocks_hold_every_slot_at_full_length() -> None:
    assert envcontract.kv_cache_blocks_for(64, 8192) == 64 * 512
    # A sequence that ends mid-block still needs that block.
    assert envcontract.kv_cache_blocks_for(8, 100) == 8 * 7
    assert envcontract.kv_cache_blocks_for(1, 16) == 1


@pytest.mark.parametrize(("name", "value", "message"), [
    ("HTTP_PORT", "8000.5", "HTTP_PORT='8000.5' is not an integer"),
    ("GRPC_PORT", "70000", "GRPC_PORT=70000 must be <= 65535"),
    ("MAX_QUEUE", "-1", "MAX_QUEUE=-1 must be >= 0"),
    ("GROUP_INDEX", "x", "GROUP_INDEX='x' is not an integer"),
    ("MICRO_BATCHES", "0", "MICRO_BATCHES=0 must be >= 1"),
    ("MASTER_PORT", "65535", "MASTER_PORT=65535 must be <= 65534"),
    ("LAYERS_PER_STAGE", "11,11", "must list PP_SIZE=3 stages"),
    ("LAYERS_PER_STAGE", "11,x,8", "is not a comma-separated list of integers"),
    ("LAYERS_PER_STAGE", "22,0,8", "every stage needs a layer"),
    ("PREFIX_CACHE", "true", "PREFIX_CACHE='true' must be 1 or 0"),
    ("KV_CACHE_BLOCKS", "-3", "KV_CACHE_BLOCKS=-3 must be >= 0"),
    ("KV_CACHE_BLOCKS", "many", "KV_CACHE_BLOCKS='many' is not an integer"),
    ("MODEL_QUANTIZATION", "int4", "MODEL_QUANTIZATION='int4' must be one of none, int8, q4, gguf"),
])
def test_bad_values_name_their_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(EnvContractError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RankEnv.from_environ({**GROUP.node_env(0), name: value})


def test_builders_ship_the_plan_split_and_the_runtime_checks_it(tmp_path: Path) -> None:
    """The pod gets status.plan.layersPerStage; a runtime that would split differently refuses to start."""
    from largemodel.operator.builders import build_children, template_revision
    from largemodel.operator.planner import plan_parallelism
    from largemodel.runtime.rank import check_planned_split

    arch = {"numAttentionHeads": 8, "numKeyValueHeads": 2, "numHiddenLayers": 6, "hiddenSize": 64,
            "intermediateSize": 128, "vocabSize": 1000}
    lm = api.LargeModel.model_validate({
        "apiVersion": api.API_VERSION, "kind": "LargeModel", "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"model": {"uri": "pvc://models/m", "architecture": arch},
                 "parallelism": {"tensor": 1, "pipeline": 2, "microBatches": 8}}})
    plan = plan_parallelism(lm.spec)
    sts = next(c for c in build_children(lm, plan, template_revision(lm, plan)) if c["kind"] == "StatefulSet")
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[envcontract.LAYERS_PER_STAGE] == ",".join(map(str, plan.layers_per_stage))

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rank_env = dataclasses.replace(RankEnv.from_environ({**GROUP.node_env(0), envcontract.PP_SIZE: "2",
                                                         envcontract.NNODES: "2", envcontract.WORLD_SIZE: "4",
                                                         envcontract.NODE_RANK: "0",
                                                         envcontract.LAYERS_PER_STAGE: "3,3"}),
                                   layers_per_stage=plan.layers_per_stage)
    check_planned_split(tmp_path, rank_env)  # the same split: starts
    skewed = dataclasses.replace(rank_env, layers_per_stage=(plan.layers_per_stage[0] - 1,
                                                            plan.layers_per_stage[1] + 1))
    with pytest.raises(EnvContractError, match="operator and runtime versions disagree"):
        check_planned_split(tmp_path, skewed)


@pytest.mark.parametrize("quantization", ["none", "int8", "q4", "gguf"])
def test_the_pods_get_spec_model_quantization(quantization: str) -> None:
    """spec.model.quantization reaches every rank as MODEL_QUANTIZATION and reads back unchanged."""
    from largemodel.operator.builders import group_env
    from largemodel.operator.planner import plan_parallelism

    arch = {"numAttentionHeads": 8, "numKeyValueHeads": 2, "numHiddenLayers": 6, "hiddenSize": 256,
            "intermediateSize": 512, "vocabSize": 1000}
    uri = "pvc://models/m.gguf" if quantization == "gguf" else "pvc://models/m"
    lm = api.LargeModel.model_validate({
        "apiVersion": api.API_VERSION, "kind": "LargeModel", "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"model": {"uri": uri, "architecture": arch, "quantization": quantization},
                 "parallelism": {"tensor": 2, "pipeline": 1}}})
    env = {e["name"]: e["value"] for e in group_env(lm, plan_parallelism(lm.spec), 0) if "value" in e}
    assert env[envcontract.MODEL_QUANTIZATION] == quantization
    assert RankEnv.from_environ({**env, envcontract.NODE_RANK: "0"}).model_quantization == quantization
