"""Pure builders: LargeModel + Plan -> the child objects of docs/DESIGN.md#operator.

Nothing here talks to the API server; the reconcile loop diffs these dicts against what exists.

Decisions made here (docs/OPERATOR.md#pods says why):
- Stage label. A StatefulSet template cannot give pods different labels, so the pipeline stage
  of a pod is the `apps.kubernetes.io/pod-index` label Kubernetes (>= 1.28) sets on StatefulSet
  pods; NODE_RANK and LWS_WORKER_INDEX come from it through the downward API, and the client
  Service selects stage-0 pods with it. `pod_stage()` reads it back (LABEL_STAGE if the operator
  copied it onto the pod, else pod-index, else the name's ordinal).
- Probes. All stages share one template, so one readiness probe must fit every stage: it is
  `GET /readyz` on the `metrics` port, which the pod's local rank 0 answers (stage 0: ready when
  the whole group loaded and joined and the server is up; other stages: ready when loaded and
  joined). Liveness is `GET /healthz` on `metrics` for every pod.
- Model volumes. pvc://CLAIM/path mounts CLAIM read-only at MODELS_MOUNT. hf://org/name is read
  from HF_CACHE_MOUNT: from the claim named by the annotation HF_CACHE_CLAIM_ANNOTATION when
  present, else from the image (models baked in). file:///path is a path inside the image.
- ownerReferences need the owner's uid, so an object without one (rendered from a file) gets none.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from largemodel import envcontract
from largemodel.hangcontract import COLLECTIVE_TIMEOUT_ENV
from largemodel.modeluri import HF_CACHE_MOUNT, MODELS_MOUNT, pvc_claim
from largemodel.operator import api, gang, lifecycle
from largemodel.operator.planner import GIB, Plan

LABEL_NAME = "serving.largemodel.io/name"
LABEL_GROUP = "serving.largemodel.io/group"
LABEL_STAGE = "serving.largemodel.io/stage"
LABEL_REVISION = "serving.largemodel.io/revision"
# Issue 17: every rank pod names its group uniquely (LargeModel + index), so exclusive topology can
# keep other groups out of a group's domain with one anti-affinity term.
LABEL_GROUP_KEY = "serving.largemodel.io/group-key"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
MANAGED_BY = {"app.kubernetes.io/managed-by": "largemodel-operator", "app.kubernetes.io/part-of": "largemodel"}
HF_CACHE_CLAIM_ANNOTATION = "serving.largemodel.io/hf-cache-claim"
CONTAINER_NAME = "rank"
RUN_AS_USER = 1000
# Bump when the builders change the pod template in a way the spec does not show, so groups roll.
TEMPLATE_SCHEMA = 3  # 2: rank ports bind POD_IP, the group secret is mounted (issue 14); 3: startupProbe,
# collective watchdog, group-key label (issue 17)
GROUP_SECRET_MODE = 0o440  # read-only for the pod's user and fsGroup


def group_name(name: str, group: int) -> str:
    """StatefulSet name of rank group `group`."""
    return f"{name}-g{group}"


def group_secret_name(name: str) -> str:
    """Secret holding the key the stage supervisors of every group authenticate each other with."""
    return f"{name}-group-secret"


def ranks_service_name(name: str) -> str:
    """Headless Service that gives every rank pod a DNS name for rendezvous."""
    return f"{name}-ranks"


def pod_stage(pod: dict[str, Any]) -> int:
    """Pipeline stage of a rank pod: LABEL_STAGE, else the pod-index label, else the name's ordinal."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    for key in (LABEL_STAGE, POD_INDEX_LABEL):
        if str(labels.get(key, "")).isdigit():
            return int(labels[key])
    return int(str(meta.get("name", "")).rsplit("-", 1)[-1])


def selector_labels(lm: api.LargeModel) -> dict[str, str]:
    """Labels every rank pod of `lm` carries; status.selector is built from these."""
    return {LABEL_NAME: lm.metadata.name}


def _owner_references(lm: api.LargeModel) -> list[dict[str, Any]]:
    if not lm.metadata.uid:
        return []
    return [
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": lm.metadata.name,
            "uid": lm.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(lm: api.LargeModel, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": lm.metadata.namespace,
        "labels": {**MANAGED_BY, **selector_labels(lm), **labels},
    }
    owners = _owner_references(lm)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def template_revision(lm: api.LargeModel, plan: Plan) -> str:
    """Short hash of everything that shapes the pod template (not replicas, restart or rollout)."""
    spec = lm.spec
    shaping = {
        "schema": TEMPLATE_SCHEMA,
        "image": spec.image,
        "engine": spec.engine,
        # quantization "none" (the default) is left out so models made before the field keep their revision.
        "model": spec.model.model_dump(mode="json", by_alias=True,
                                       exclude={"quantization"} if spec.model.quantization == "none" else None),
        "layout": [plan.tp, plan.pp, plan.micro_batches],
        # Who may connect (the NetworkPolicy) does not shape pods: editing it must not roll groups.
        "serving": spec.serving.model_dump(mode="json", by_alias=True, exclude={"allow_from", "network_policy"}),
        "gpu": spec.gpu.resource,
        "placement": spec.placement.model_dump(mode="json", by_alias=True),
        "startup": spec.startup.model_dump(mode="json", by_alias=True),
        "collectiveTimeout": spec.restart.collective_timeout_seconds,
        "hfCache": lm.metadata.annotations.get(HF_CACHE_CLAIM_ANNOTATION, ""),
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def rank_group_env(lm: api.LargeModel, plan: Plan, group: int, *, master_addr: str | None = None,
                   master_port: int = envcontract.DEFAULT_MASTER_PORT, model_uri: str | None = None,
                   http_port: int | None = None, grpc_port: int | None = None) -> envcontract.RankGroupEnv:
    """What one group's ranks are told, from the LargeModel and its plan: the one place that maps the API onto
    the env contract, for the operator's pods and for `largemodel run` (which overrides address, ports and
    the model path)."""
    spec = lm.spec
    return envcontract.RankGroupEnv(
        master_addr=master_addr or envcontract.master_address(lm.metadata.name, group, lm.metadata.namespace),
        master_port=master_port,
        tp=plan.tp,
        pp=plan.pp,
        group_index=group,
        model_uri=model_uri or spec.model.uri,
        model_dtype=spec.model.dtype,
        model_quantization=spec.model.quantization,
        micro_batches=plan.micro_batches,
        engine=spec.engine,
        http_port=spec.serving.http_port if http_port is None else http_port,
        grpc_port=spec.serving.grpc_port if grpc_port is None else grpc_port,
        metrics_port=spec.serving.metrics_port,
        max_batch_size=spec.serving.max_batch_size,
        max_queue=spec.serving.max_queue,
        max_model_len=spec.serving.max_model_len,
        model_name=lm.metadata.name,
        layers_per_stage=plan.layers_per_stage,
        prefix_cache=spec.serving.prefix_cache,
        kv_cache_blocks=plan.kv_cache_blocks,
    )


def group_env(lm: api.LargeModel, plan: Plan, group: int) -> list[dict[str, Any]]:
    """The env contract of one group's pods: group-wide values plus NODE_RANK from the pod index."""
    spec = lm.spec
    contract = rank_group_env(lm, plan, group)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in contract.as_env().items()]
    for var in (envcontract.NODE_RANK, envcontract.LWS_WORKER_INDEX):
        env.append({"name": var, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}})
    # Rank-to-rank ports (rendezvous, liveness) bind the pod IP only; peers prove the group secret.
    env.append({"name": envcontract.POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env.append({"name": envcontract.GROUP_SECRET_FILE,
                "value": f"{envcontract.GROUP_SECRET_MOUNT}/{envcontract.GROUP_SECRET_KEY}"})
    env.append({"name": COLLECTIVE_TIMEOUT_ENV, "value": str(spec.restart.collective_timeout_seconds)})
    env.append({"name": envcontract.DRAIN_GRACE_SECONDS, "value": str(spec.serving.drain_seconds)})
    if spec.serving.api_key_secret:
        env.append({"name": envcontract.API_KEY_FILE, "value": f"{envcontract.API_KEY_MOUNT}/{envcontract.API_KEY_KEY}"})
    return env


def _volumes(lm: api.LargeModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): writable /tmp and /dev/shm under a read-only root, plus the model."""
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        # NCCL and the pipeline's p2p buffers use shared memory; the default 64 MiB is far too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes.append({"name": "group-secret", "secret": {"secretName": group_secret_name(lm.metadata.name),
                                                       "defaultMode": GROUP_SECRET_MODE}})
    mounts.append({"name": "group-secret", "mountPath": envcontract.GROUP_SECRET_MOUNT, "readOnly": True})
    if lm.spec.serving.api_key_secret:
        volumes.append({"name": "api-key", "secret": {
            "secretName": lm.spec.serving.api_key_secret, "defaultMode": GROUP_SECRET_MODE,
            "items": [{"key": envcontract.API_KEY_KEY, "path": envcontract.API_KEY_KEY}]}})
        mounts.append({"name": "api-key", "mountPath": envcontract.API_KEY_MOUNT, "readOnly": True})
    claim = pvc_claim(lm.spec.model.uri)
    hf_claim = lm.metadata.annotations.get(HF_CACHE_CLAIM_ANNOTATION)
    if claim:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True})
    elif lm.spec.model.uri.startswith("hf://") and hf_claim:
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": hf_claim, "readOnly": True}})
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_MOUNT, "readOnly": True})
    return volumes, mounts


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(lm: api.LargeModel, plan: Plan, group: int) -> dict[str, Any]:
    serving = lm.spec.serving
    gpus = {lm.spec.gpu.resource: str(plan.tp)}
    _, mounts = _volumes(lm)
    return {
        "name": CONTAINER_NAME,
        "image": lm.spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["largemodel", "rank"],
        "env": group_env(lm, plan, group),
        "ports": [
            {"name": "http", "containerPort": serving.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": serving.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": serving.metrics_port, "protocol": "TCP"},
            {"name": "dist", "containerPort": envcontract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
        ],
        # Extended resources must have requests == limits; one pod holds one stage's tp GPUs.
        "resources": {"requests": dict(gpus), "limits": dict(gpus)},
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        # Liveness starts once the startupProbe passed (this pod's shards are in memory); the
        # startupProbe's budget is sized from the plan's weight bytes per GPU (issue 17).
        "startupProbe": lifecycle.startup_probe(plan, lm.spec.startup.load_rate_mb_per_second,
                                                lm.spec.startup.timeout_seconds, "metrics"),
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }


def _affinity(lm: api.LargeModel, group: int) -> dict[str, Any]:
    """Stages of a group prefer one packTopologyKey domain; with topologyKey they must share one, and
    with exclusive no other group's rank pod may be in it (LeaderWorkerSet's exclusive topology)."""
    placement = lm.spec.placement
    group_labels = {LABEL_NAME: lm.metadata.name, LABEL_GROUP: str(group)}
    pod_affinity: dict[str, Any] = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": group_labels},
                                                "topologyKey": placement.pack_topology_key}}
        ]
    }
    affinity: dict[str, Any] = {"podAffinity": pod_affinity}
    if placement.topology_key:
        pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [
            {"labelSelector": {"matchLabels": group_labels}, "topologyKey": placement.topology_key}
        ]
    if placement.topology_key and placement.exclusive:
        key = group_key(lm.metadata.name, group)
        affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [
                {"key": LABEL_GROUP_KEY, "operator": "Exists"},
                {"key": LABEL_GROUP_KEY, "operator": "NotIn", "values": [key]},
            ]},
            "topologyKey": placement.topology_key,
            "namespaceSelector": {},  # groups of every namespace stay out
        }]}
    return affinity


def group_key(name: str, group: int) -> str:
    """The LABEL_GROUP_KEY value of a group's pods (unique within a namespace)."""
    return group_name(name, group)


def _pod_spec(lm: api.LargeModel, plan: Plan, group: int) -> dict[str, Any]:
    placement = lm.spec.placement
    volumes, _ = _volumes(lm)
    spec: dict[str, Any] = {
        "containers": [_container(lm, plan, group)],
        "volumes": volumes,
        # Rank pods never call the API server; without a token a compromised pod cannot either.
        "automountServiceAccountToken": False,
        # Service env vars for every Service in the namespace would only clutter the rank's env.
        "enableServiceLinks": False,
        # SIGTERM drains in-flight streams (serving.drainSeconds) before the engine shuts down.
        "terminationGracePeriodSeconds": envcontract.termination_grace_seconds(lm.spec.serving.drain_seconds),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": _affinity(lm, group),
    }
    scheduler = gang.scheduler_name(placement)
    if scheduler:
        spec["schedulerName"] = scheduler
    if placement.node_selector:
        spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in placement.tolerations]
    return spec


def build_group_statefulset(lm: api.LargeModel, plan: Plan, group: int, revision: str) -> dict[str, Any]:
    """StatefulSet `NAME-g<group>`: pp pods (one per stage), each holding tp GPUs."""
    group_labels = {LABEL_GROUP: str(group)}
    sts_name = group_name(lm.metadata.name, group)
    gang_labels, gang_annotations = gang.pod_metadata(lm.spec.placement, plan, sts_name)
    pod_labels = {**selector_labels(lm), **group_labels, LABEL_REVISION: revision,
                  LABEL_GROUP_KEY: group_key(lm.metadata.name, group), **gang_labels}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(lm, group_name(lm.metadata.name, group), {**group_labels, LABEL_REVISION: revision}),
        "spec": {
            "replicas": plan.pp,
            "serviceName": ranks_service_name(lm.metadata.name),
            # Stages rendezvous with each other, so none may wait for another to become Ready.
            "podManagementPolicy": "Parallel",
            # The operator rolls whole groups itself; the StatefulSet controller must not.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": {**selector_labels(lm), **group_labels}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER_NAME, **gang_annotations},
                },
                "spec": _pod_spec(lm, plan, group),
            },
        },
    }


def build_ranks_service(lm: api.LargeModel) -> dict[str, Any]:
    """Headless Service `NAME-ranks`: stable DNS for every rank pod, ready or not (rendezvous)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(lm, ranks_service_name(lm.metadata.name), {}),
        "spec": {
            "clusterIP": "None",
            # Ranks must find stage 0 before anyone is Ready: readiness needs the group joined.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(lm),
            "ports": [
                {"name": "dist", "port": envcontract.DEFAULT_MASTER_PORT, "targetPort": "dist", "protocol": "TCP"},
                {"name": "metrics", "port": lm.spec.serving.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def build_client_service(lm: api.LargeModel) -> dict[str, Any]:
    """Service `NAME`: the OpenAI HTTP and gRPC endpoints of every group's stage-0 pod."""
    serving = lm.spec.serving
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(lm, lm.metadata.name, {}),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(lm), POD_INDEX_LABEL: "0"},
            "ports": [
                {"name": "http", "port": serving.http_port, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": serving.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
            ],
        },
    }


def build_group_secret(lm: api.LargeModel, value: str) -> dict[str, Any]:
    """Secret `NAME-group-secret`: the key every group's stage supervisors authenticate with.

    The operator creates it (with a fresh random `value`) before the first group and never reads
    it back; pods mount it. Deleting the LargeModel deletes it (ownerReference).
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(lm, group_secret_name(lm.metadata.name), {}),
        "type": "Opaque",
        "stringData": {envcontract.GROUP_SECRET_KEY: value},
    }


def build_network_policy(lm: api.LargeModel) -> dict[str, Any]:
    """NetworkPolicy `NAME`: rank pods take rank traffic only from this LargeModel's own pods.

    Rendezvous, liveness and the p2p ports (gloo and NCCL pick these at random) are open to the
    LargeModel's pods only; HTTP and gRPC to spec.serving.allowFrom (anyone when empty); the
    metrics port to anyone (Prometheus, probes). Egress is not restricted.
    """
    serving = lm.spec.serving
    peers: list[dict[str, Any]] = []
    for peer in serving.allow_from:
        item: dict[str, Any] = {}
        if peer.pod_selector is not None:
            item["podSelector"] = {"matchLabels": dict(peer.pod_selector)}
        if peer.namespace_selector is not None:
            item["namespaceSelector"] = {"matchLabels": dict(peer.namespace_selector)}
        if peer.cidr is not None:
            item["ipBlock"] = {"cidr": peer.cidr}
        peers.append(item)
    api_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": serving.http_port},
                                          {"protocol": "TCP", "port": serving.grpc_port}]}
    if peers:
        api_rule["from"] = peers
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(lm, lm.metadata.name, {}),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(lm)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector_labels(lm)}}]},
                api_rule,
                {"ports": [{"protocol": "TCP", "port": serving.metrics_port}]},
            ],
        },
    }


def build_podgroup(lm: api.LargeModel, plan: Plan, group: int) -> dict[str, Any] | None:
    """The gang scheduler's PodGroup of group `group` (named like its StatefulSet); None when
    spec.placement.gang needs no object (none, kueue). See operator/gang.py."""
    meta = _metadata(lm, group_name(lm.metadata.name, group), {LABEL_GROUP: str(group)})
    return gang.build_podgroup(lm, plan, meta)


def weight_bytes_per_gpu(plan: Plan) -> float:
    """The plan's weight bytes per GPU (what one rank reads at startup)."""
    return plan.weight_gib_per_gpu * GIB


def build_children(lm: api.LargeModel, plan: Plan, revision: str) -> list[dict[str, Any]]:
    """Every child of `lm` but the group Secret: each group's PodGroup (gang scheduling) and
    StatefulSet, the ranks and client Services, and the NetworkPolicy (unless
    spec.serving.networkPolicy is false)."""
    groups: list[dict[str, Any]] = []
    for g in range(lm.spec.replicas):
        podgroup = build_podgroup(lm, plan, g)
        groups += [podgroup] if podgroup is not None else []
        groups.append(build_group_statefulset(lm, plan, g, revision))
    policy = [build_network_policy(lm)] if lm.spec.serving.network_policy else []
    return [*groups, build_ranks_service(lm), build_client_service(lm), *policy]


def endpoint(lm: api.LargeModel) -> str:
    """The OpenAI base URL inside the cluster (status.endpoint)."""
    return f"http://{lm.metadata.name}.{lm.metadata.namespace}.svc:{lm.spec.serving.http_port}/v1"
