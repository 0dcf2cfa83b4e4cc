"""Table tests of the manifest builders: names, env per stage, GPUs, schemas for Kubernetes 1.28 and 1.37."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from largemodel import envcontract
from largemodel.envcontract import RankEnv
from largemodel.modeluri import HF_CACHE_MOUNT, MODELS_MOUNT, resolve_model_dir
from largemodel.operator import api
from largemodel.operator.builders import (
    HF_CACHE_CLAIM_ANNOTATION,
    LABEL_GROUP,
    LABEL_NAME,
    LABEL_REVISION,
    LABEL_STAGE,
    POD_INDEX_LABEL,
    build_children,
    build_client_service,
    build_group_statefulset,
    build_ranks_service,
    pod_stage,
    template_revision,
)
from largemodel.operator.planner import plan_parallelism
from tests.support.examples import LLAMA3_70B, LLAMA31_405B, example, make_lm

UID = "0b7c6f1e-7f5e-4a3a-9c53-1d2e3f4a5b6c"


def lm_with(tp: int | str, pp: int | str, replicas: int, arch: dict[str, Any] = LLAMA3_70B, **spec: Any) -> api.LargeModel:
    """A LargeModel named `llm` in namespace `serving` with the given layout."""
    body = {
        "model": {"uri": "pvc://weights/llama/70b", "architecture": arch},
        "parallelism": {"tensor": tp, "pipeline": pp, "microBatches": 8},
        "replicas": replicas,
        **spec,
    }
    return make_lm(body, name="llm", namespace="serving", uid=UID)


def pod_env(sts: dict[str, Any], stage: int) -> dict[str, str]:
    """The env a pod at `stage` sees: values, with the downward-API label resolved as the kubelet does."""
    pod_labels = {**sts["spec"]["template"]["metadata"]["labels"], POD_INDEX_LABEL: str(stage)}
    env = {}
    for var in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            if path == "status.podIP":
                env[var["name"]] = f"10.0.0.{stage + 1}"
                continue
            assert path == f"metadata.labels['{POD_INDEX_LABEL}']"
            env[var["name"]] = pod_labels[POD_INDEX_LABEL]
    return env


# (tp, pp, replicas, gpu per pod, stages, groups)
LAYOUTS = [(8, 1, 1), (4, 2, 1), (2, 4, 3), (8, 2, 2), (1, 5, 1)]


@pytest.mark.parametrize(("tp", "pp", "replicas"), LAYOUTS)
def test_children_names_gpus_and_env_per_stage(tp: int, pp: int, replicas: int) -> None:
    lm = lm_with(tp, pp, replicas)
    plan = plan_parallelism(lm.spec)
    revision = template_revision(lm, plan)
    children = build_children(lm, plan, revision)
    names = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert names == [("StatefulSet", f"llm-g{g}") for g in range(replicas)] + [
        ("Service", "llm-ranks"), ("Service", "llm"), ("NetworkPolicy", "llm")]
    for group, sts in enumerate(children[:replicas]):
        spec = sts["spec"]
        assert spec["replicas"] == pp and spec["serviceName"] == "llm-ranks"
        assert spec["podManagementPolicy"] == "Parallel" and spec["updateStrategy"] == {"type": "OnDelete"}
        assert spec["selector"]["matchLabels"] == {LABEL_NAME: "llm", LABEL_GROUP: str(group)}
        labels = spec["template"]["metadata"]["labels"]
        assert labels == {LABEL_NAME: "llm", LABEL_GROUP: str(group), LABEL_REVISION: revision,
                          "serving.largemodel.io/group-key": f"llm-g{group}"}
        container = spec["template"]["spec"]["containers"][0]
        assert container["command"] == ["largemodel", "rank"]
        assert container["resources"] == {"requests": {"nvidia.com/gpu": str(tp)}, "limits": {"nvidia.com/gpu": str(tp)}}
        for stage in range(pp):
            env = pod_env(sts, stage)
            # The runtime parses exactly this env: the contract round-trips.
            rank_env = envcontract.RankEnv.from_environ(env)
            assert env["MASTER_ADDR"] == env["LWS_LEADER_ADDRESS"] == f"llm-g{group}-0.llm-ranks.serving.svc"
            assert (rank_env.node_rank, rank_env.tp, rank_env.pp, rank_env.world_size) == (stage, tp, pp, tp * pp)
            assert (env["NNODES"], env["NPROC_PER_NODE"], env["LWS_GROUP_SIZE"]) == (str(pp), str(tp), str(pp))
            assert env["LWS_WORKER_INDEX"] == str(stage) and env["GROUP_INDEX"] == str(group)
            assert env["MODEL_URI"] == "pvc://weights/llama/70b" and env["MODEL_DTYPE"] == "bfloat16"
            assert env["MICRO_BATCHES"] == "8" and env["ENGINE"] == "native" and env["MODEL_NAME"] == "llm"
            assert [rank_env.global_rank(r) for r in range(tp)] == list(range(stage * tp, (stage + 1) * tp))
    ranks, client = children[replicas], children[replicas + 1]
    assert ranks["spec"]["clusterIP"] == "None" and ranks["spec"]["publishNotReadyAddresses"] is True
    assert ranks["spec"]["selector"] == {LABEL_NAME: "llm"}
    assert client["spec"]["selector"] == {LABEL_NAME: "llm", POD_INDEX_LABEL: "0"}
    assert {p["name"]: p["port"] for p in client["spec"]["ports"]} == {"http": 8000, "grpc": 9000}


@pytest.mark.parametrize("version", ["1.28", "1.37"])
@pytest.mark.parametrize("source", ["smollm2-local.yaml", "llama3-70b.yaml", "llama31-405b.yaml", "layouts"])
def test_every_built_object_validates(version: str, source: str) -> None:
    if source == "layouts":
        lms = [lm_with(tp, pp, r) for tp, pp, r in LAYOUTS]
    else:
        body = example(source)
        body["metadata"]["uid"] = UID
        lms = [api.LargeModel.model_validate(body)]
    for lm in lms:
        plan = plan_parallelism(lm.spec)
        for child in build_children(lm, plan, template_revision(lm, plan)):
            kubernetes_validate.validate(child, version, strict=True)


def test_every_child_is_owned_and_labelled() -> None:
    lm = lm_with(8, 2, 2)
    plan = plan_parallelism(lm.spec)
    for child in build_children(lm, plan, "abc123"):
        meta = child["metadata"]
        assert meta["namespace"] == "serving" and meta["labels"][LABEL_NAME] == "llm"
        assert meta["ownerReferences"] == [
            {"apiVersion": "serving.largemodel.io/v1alpha1", "kind": "LargeModel", "name": "llm", "uid": UID,
             "controller": True, "blockOwnerDeletion": True}
        ]


def test_without_a_uid_there_is_no_owner_reference() -> None:
    lm = make_lm(example("llama3-70b.yaml")["spec"], name="llm")
    plan = plan_parallelism(lm.spec)
    assert all("ownerReferences" not in c["metadata"] for c in build_children(lm, plan, "r"))


def test_pod_security_probes_placement_and_writable_paths() -> None:
    body = example("llama3-70b.yaml")
    body["metadata"]["uid"] = UID
    lm = api.LargeModel.model_validate(body)
    plan = plan_parallelism(lm.spec)
    pod = build_group_statefulset(lm, plan, 0, "r")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts[MODELS_MOUNT]["name"]]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mounts[MODELS_MOUNT]["readOnly"] is True
    # The runtime finds the weights where the mount puts them.
    assert str(resolve_model_dir(lm.spec.model.uri)) == f"{MODELS_MOUNT}/meta-llama/Meta-Llama-3-70B-Instruct"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000 and ports["grpc"] == 9000 and ports["metrics"] == 9100
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    term = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term == {"labelSelector": {"matchLabels": {LABEL_NAME: "llama3-70b", LABEL_GROUP: "0"}},
                    "topologyKey": "topology.kubernetes.io/zone"}


@pytest.mark.parametrize(
    ("uri", "annotations", "mount", "claim"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", {}, None, None),
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", {HF_CACHE_CLAIM_ANNOTATION: "hf-cache"}, HF_CACHE_MOUNT, "hf-cache"),
        ("file:///opt/models/smollm2", {}, None, None),
        ("pvc://smol/SmolLM2", {}, MODELS_MOUNT, "smol"),
    ],
)
def test_model_volume_per_uri_scheme(uri: str, annotations: dict[str, str], mount: str | None, claim: str | None) -> None:
    body = example("smollm2-local.yaml")
    body["spec"]["model"]["uri"] = uri
    body["metadata"]["annotations"] = annotations
    lm = api.LargeModel.model_validate(body)
    pod = build_group_statefulset(lm, plan_parallelism(lm.spec), 0, "r")["spec"]["template"]["spec"]
    model_mounts = [m for m in pod["containers"][0]["volumeMounts"]
                    if m["mountPath"] not in ("/tmp", "/dev/shm", "/var/run/largemodel/group")]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert [m["mountPath"] for m in model_mounts] == ([mount] if mount else [])
    assert claims == ([claim] if claim else [])
    if mount:
        assert str(resolve_model_dir(uri)).startswith(mount)


def test_revision_changes_with_the_pod_template_only() -> None:
    base = lm_with(8, 2, 1)
    plan = plan_parallelism(base.spec)
    revision = template_revision(base, plan)
    assert revision == template_revision(lm_with(8, 2, 1), plan) and len(revision) == 10
    # Scaling, restart budget and rollout pace do not touch pods.
    for unchanged in (lm_with(8, 2, 5), lm_with(8, 2, 1, restart={"maxGroupRestarts": 9}),
                      lm_with(8, 2, 1, rollout={"maxUnavailableGroups": 2}),
                      lm_with(8, 2, 1, serving={"allowFrom": [{"cidr": "10.0.0.0/8"}], "networkPolicy": False})):
        assert template_revision(unchanged, plan_parallelism(unchanged.spec)) == revision
    for changed in (lm_with(8, 2, 1, image="largemodel-runtime:0.2.0"), lm_with(4, 2, 1),
                    lm_with(8, 2, 1, serving={"maxBatchSize": 32}),
                    lm_with(8, 2, 1, serving={"apiKeySecret": "keys"})):
        assert template_revision(changed, plan_parallelism(changed.spec)) != revision
    # DeepSpeed runs pp=1 only (the planner says so): compare the engines at pp=1.
    native, deepspeed = lm_with(8, 1, 1), lm_with(8, 1, 1, engine="deepspeed")
    assert (template_revision(native, plan_parallelism(native.spec))
            != template_revision(deepspeed, plan_parallelism(deepspeed.spec)))


def test_services_follow_serving_ports() -> None:
    lm = lm_with(8, 2, 1, serving={"httpPort": 8080, "grpcPort": 50051, "metricsPort": 9400})
    client, ranks = build_client_service(lm), build_ranks_service(lm)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in client["spec"]["ports"]} == {
        "http": (8080, "http"), "grpc": (50051, "grpc")}
    assert {p["name"]: p["port"] for p in ranks["spec"]["ports"]} == {"dist": 29500, "metrics": 9400}


def test_405b_auto_renders_two_stage_groups_of_8_gpus() -> None:
    lm = make_lm(example("llama31-405b.yaml")["spec"], name="big", uid=UID)
    plan = plan_parallelism(lm.spec)
    sts = build_group_statefulset(lm, plan, 0, "r")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert LLAMA31_405B["numHiddenLayers"] == sum(plan.layers_per_stage)


@pytest.mark.parametrize(
    ("labels", "name", "stage"),
    [({LABEL_STAGE: "2", POD_INDEX_LABEL: "1"}, "x-g0-1", 2), ({POD_INDEX_LABEL: "1"}, "x-g0-5", 1), ({}, "x-g0-3", 3)],
)
def test_pod_stage(labels: dict[str, str], name: str, stage: int) -> None:
    assert pod_stage({"metadata": {"name": name, "labels": labels}}) == stage


def test_the_schema_check_is_strict_enough_to_fail() -> None:
    lm = lm_with(8, 1, 1)
    sts = build_group_statefulset(lm, plan_parallelism(lm.spec), 0, "r")
    sts["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, "1.37", strict=True)


def test_api_key_secret_is_mounted_and_named_for_the_server() -> None:
    lm = lm_with(8, 2, 1, serving={"apiKeySecret": "llm-keys"})
    pod = build_group_statefulset(lm, plan_parallelism(lm.spec), 0, "r")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-key")
    assert volume["secret"]["secretName"] == "llm-keys"
    assert volume["secret"]["items"] == [{"key": "apiKey", "path": "apiKey"}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["API_KEY_FILE"] == "/var/run/largemodel/api/apiKey"
    plain = lm_with(8, 2, 1)
    pod = build_group_statefulset(plain, plan_parallelism(plain.spec), 0, "r")["spec"]["template"]["spec"]
    assert "api-key" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize("prefix_cache", [True, False, None])
def test_prefix_cache_and_kv_blocks_reach_every_rank(prefix_cache: bool | None) -> None:
    serving: dict[str, Any] = {"maxBatchSize": 8, "maxModelLen": 1000}
    if prefix_cache is not None:
        serving["prefixCache"] = prefix_cache
    lm = lm_with(4, 2, 1, serving=serving)
    plan = plan_parallelism(lm.spec)
    # 8 sequences of ceil(1000 / 16) = 63 blocks: the plan's KV memory, in 16-token blocks.
    assert plan.kv_cache_blocks == 8 * 63 and plan.to_status().kv_cache_blocks == 8 * 63
    assert plan.to_status().model_dump(by_alias=True)["kvCacheBlocks"] == 504
    sts = build_group_statefulset(lm, plan, 0, "r")
    for stage in range(2):
        env = RankEnv.from_environ(pod_env(sts, stage))
        assert env.prefix_cache is (prefix_cache is not False)
        assert env.kv_cache_blocks == 504
