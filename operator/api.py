"""The LargeModel API (group serving.largemodel.io, version v1alpha1) as pydantic models.

These models are the single source of truth: the CRD in crds/ is generated from them
(`largemodel crd`), the CLI validates files with them, and the operator parses every
resource it reads through them. CEL rules that need no model knowledge ride along in
`x-kubernetes-validations` via json_schema_extra.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from largemodel import envcontract, modelfacts

GROUP = "serving.largemodel.io"
VERSION = "v1alpha1"
API_VERSION: Final = "serving.largemodel.io/v1alpha1"
KIND: Final = "LargeModel"
PLURAL = "largemodels"
SINGULAR = "largemodel"
SHORT_NAMES = ["lm"]
NAME_MAX_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(ge=1)]
Dtype = Literal["float32", "float16", "bfloat16"]
Quantization = Literal["none", "int8", "q4", "gguf"]

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class _Spec(BaseModel):
    """Base for spec parts: camelCase on the wire, unknown fields rejected (as the API server prunes)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class Architecture(_Spec):
    """The shapes the planner needs; `largemodel inspect config.json` prints this block."""

    num_attention_heads: int = Field(alias="numAttentionHeads", ge=1)
    num_key_value_heads: int = Field(alias="numKeyValueHeads", ge=1)
    num_hidden_layers: int = Field(alias="numHiddenLayers", ge=1)
    hidden_size: int = Field(alias="hiddenSize", ge=1)
    intermediate_size: int = Field(alias="intermediateSize", ge=1)
    vocab_size: int = Field(alias="vocabSize", ge=1)
    parameters: float | None = Field(
        default=None, ge=1,
        description="Total parameter count (tied embeddings counted once); when absent, computed from the "
                    "shapes as `largemodel inspect` does (no biases) and reported in status.plan.")
    head_dim: int | None = Field(default=None, alias="headDim", ge=1)
    tie_word_embeddings: bool = Field(default=False, alias="tieWordEmbeddings")

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            (
                "self.numAttentionHeads % self.numKeyValueHeads == 0",
                "numAttentionHeads must be a multiple of numKeyValueHeads",
            ),
        ),
    )

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> Architecture:
        # Mirrors the CEL rule above so files checked by the CLI fail the same way.
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("numAttentionHeads must be a multiple of numKeyValueHeads")
        return self

    @property
    def kv_head_dim(self) -> int:
        """Dimension of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def parameter_total(self) -> float:
        """`parameters` when given, else the count computed from the shapes (a Llama decoder without biases)."""
        if self.parameters is not None:
            return self.parameters
        return float(modelfacts.parameter_count(
            hidden=self.hidden_size, intermediate=self.intermediate_size, layers=self.num_hidden_layers,
            heads=self.num_attention_heads, kv_heads=self.num_key_value_heads, head_dim=self.kv_head_dim,
            vocab=self.vocab_size, tied=self.tie_word_embeddings))


class ModelSource(_Spec):
    """Where the weights live and in which dtype the engine runs them."""

    uri: str = Field(
        min_length=1,
        description="pvc://CLAIM/path, file:///path, hf://org/name (from a cache or PVC).",
        json_schema_extra=_cel(
            (
                "self.startsWith('pvc://') || self.startsWith('file://') || self.startsWith('hf://') "
                "|| self.startsWith('s3://')",
                "model.uri must start with pvc://, file://, hf:// or s3://",
            )
        ),
    )
    dtype: Dtype = "bfloat16"
    quantization: Quantization = Field(
        default="none",
        description="Weight format the engine serves: none (the dtype); int8 (weight-only, one scale per "
                    "output channel); q4 (4-bit blocks of 32 weights with a scale and an offset, like GGUF "
                    "Q4_1); gguf (a .gguf file's own quantized tensors as they are). Only the attention and "
                    "MLP linears are quantized; embeddings, LM head and norms stay in dtype. engine native only.")
    architecture: Architecture | None = None

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            (
                "!has(self.quantization) || self.quantization != 'gguf' || self.uri.endsWith('.gguf') "
                "|| self.uri.endsWith('.GGUF')",
                "model.quantization gguf needs model.uri to name a .gguf file",
            ),
        ),
    )

    @model_validator(mode="after")
    def _gguf_needs_gguf_file(self) -> ModelSource:
        # Mirrors the CEL rule above so files checked by the CLI fail the same way.
        problem = modelfacts.quantization_problem(quantization=self.quantization,
                                                  gguf_source=modelfacts.is_gguf_uri(self.uri))
        if problem:
            raise ValueError(problem)
        return self


class Parallelism(_Spec):
    """Tensor and pipeline sizes, or `auto` to let the planner choose."""

    tensor: PositiveInt | Auto = Field(default="auto", description="TP size (GPUs per pod) or auto.")
    pipeline: PositiveInt | Auto = Field(default="auto", description="PP size (pods per group) or auto.")
    micro_batches: int = Field(default=4, alias="microBatches", ge=1, description="Micro-batches in flight.")

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            ("self.microBatches >= 1", "parallelism.microBatches must be >= 1"),
            (
                "type(self.tensor) == string ? self.tensor == 'auto' : self.tensor >= 1",
                "parallelism.tensor must be an integer >= 1 or 'auto'",
            ),
            (
                "type(self.pipeline) == string ? self.pipeline == 'auto' : self.pipeline >= 1",
                "parallelism.pipeline must be an integer >= 1 or 'auto'",
            ),
        ),
    )


class Gpu(_Spec):
    """The GPU shape of the nodes the model runs on."""

    resource: str = Field(default="nvidia.com/gpu", min_length=1)
    per_node: int = Field(default=8, alias="perNode", ge=1, le=64)
    memory_gib: float = Field(default=80, alias="memoryGiB", gt=0)


class NetworkPeer(_Spec):
    """Clients allowed to reach the API ports: pods by labels (in namespaces by labels), or a CIDR."""

    pod_selector: dict[str, str] | None = Field(
        default=None, alias="podSelector",
        description="matchLabels of client pods (in this namespace unless namespaceSelector is set too).")
    namespace_selector: dict[str, str] | None = Field(
        default=None, alias="namespaceSelector", description="matchLabels of namespaces whose pods may connect.")
    cidr: str | None = Field(default=None, max_length=64, description="An IP block, e.g. 10.0.0.0/8.")

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            ("has(self.podSelector) || has(self.namespaceSelector) || has(self.cidr)",
             "serving.allowFrom: each entry needs podSelector, namespaceSelector or cidr"),
            ("!has(self.cidr) || !(has(self.podSelector) || has(self.namespaceSelector))",
             "serving.allowFrom: cidr cannot be combined with podSelector or namespaceSelector"),
        ),
    )

    @model_validator(mode="after")
    def _not_empty(self) -> NetworkPeer:
        # Mirrors the CEL rule: an empty peer would silently admit everyone.
        if self.pod_selector is None and self.namespace_selector is None and self.cidr is None:
            raise ValueError("serving.allowFrom: each entry needs podSelector, namespaceSelector or cidr")
        if self.cidr is not None and (self.pod_selector is not None or self.namespace_selector is not None):
            raise ValueError("serving.allowFrom: cidr cannot be combined with podSelector or namespaceSelector")
        return self


class Serving(_Spec):
    """Ports, admission limits and exposure of the serving rank."""

    http_port: int = Field(default=envcontract.DEFAULT_HTTP_PORT, alias="httpPort", ge=1, le=65535)
    grpc_port: int = Field(default=envcontract.DEFAULT_GRPC_PORT, alias="grpcPort", ge=1, le=65535)
    metrics_port: int = Field(default=envcontract.DEFAULT_METRICS_PORT, alias="metricsPort", ge=1, le=65535)
    max_batch_size: int = Field(default=envcontract.DEFAULT_MAX_BATCH_SIZE, alias="maxBatchSize", ge=1)
    max_queue: int = Field(default=envcontract.DEFAULT_MAX_QUEUE, alias="maxQueue", ge=0)
    max_model_len: int = Field(default=envcontract.DEFAULT_MAX_MODEL_LEN, alias="maxModelLen", ge=1)
    api_key_secret: str = Field(
        default="", alias="apiKeySecret", max_length=253,
        description="Name of a Secret in this namespace whose key `apiKey` is the bearer token every "
                    "/v1 request (HTTP Authorization header, gRPC `authorization` metadata) must carry; "
                    "empty: no API authentication.")
    allow_from: list[NetworkPeer] = Field(
        default_factory=list, alias="allowFrom", max_length=32,
        description="Who may reach the HTTP and gRPC ports (NetworkPolicy peers); empty: anyone. Rank "
                    "ports admit only this LargeModel's own pods whatever this says.")
    drain_seconds: int = Field(
        default=envcontract.DEFAULT_DRAIN_SECONDS, alias="drainSeconds", ge=0, le=3600,
        description="When a group goes (scale-down, rollout, deletion) its stage-0 pod stops admitting, "
                    "leaves the client Service and lets admitted requests finish for up to this many "
                    "seconds before the group shuts down.")
    prefix_cache: bool = Field(
        default=True, alias="prefixCache",
        description="Reuse the KV cache of a cached prompt prefix (paged KV cache, 16-token blocks); "
                    "outputs are the same either way.")
    network_policy: bool = Field(
        default=True, alias="networkPolicy",
        description="Create a NetworkPolicy for the rank pods (rank ports from the group's own pods only).")

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            ("self.httpPort != self.grpcPort", "serving.httpPort and serving.grpcPort must differ"),
            (
                "self.metricsPort != self.httpPort && self.metricsPort != self.grpcPort",
                "serving.metricsPort must differ from httpPort and grpcPort",
            ),
        ),
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> Serving:
        # Mirrors the CEL rules above so files checked by the CLI fail the same way.
        if self.http_port == self.grpc_port:
            raise ValueError("serving.httpPort and serving.grpcPort must differ")
        if self.metrics_port in (self.http_port, self.grpc_port):
            raise ValueError("serving.metricsPort must differ from httpPort and grpcPort")
        return self


class Toleration(_Spec):
    """A pod toleration, as in core/v1."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")


GangMode = Literal["none", "scheduler-plugins", "volcano", "kueue"]


class Placement(_Spec):
    """Where rank pods may go, how a group is scheduled as one, and how its stages are packed."""

    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[Toleration] = Field(default_factory=list)
    pack_topology_key: str = Field(default="topology.kubernetes.io/zone", alias="packTopologyKey")
    gang: GangMode = Field(
        default="none",
        description="Gang scheduling of each rank group: none; scheduler-plugins (a PodGroup "
                    "scheduling.x-k8s.io/v1alpha1 per group, minMember = pp); volcano (a PodGroup "
                    "scheduling.volcano.sh/v1beta1 per group and schedulerName volcano); kueue (the pod-group "
                    "labels and annotation Kueue's pod integration reads).")
    scheduler_name: str = Field(
        default="", alias="schedulerName", max_length=253,
        description="schedulerName of the rank pods; empty: scheduler-plugins-scheduler for gang "
                    "scheduler-plugins, volcano for gang volcano, the cluster default otherwise.")
    queue_name: str = Field(
        default="", alias="queueName", max_length=253,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name) or Volcano Queue (PodGroup spec.queue).")
    schedule_timeout_seconds: int = Field(
        default=600, alias="scheduleTimeoutSeconds", ge=1,
        description="scheduler-plugins PodGroup scheduleTimeoutSeconds: how long placed pods wait for the rest.")
    topology_key: str = Field(
        default="", alias="topologyKey", max_length=317,
        description="A node label (rack, NVLink domain, zone): every stage of a group must land in one domain "
                    "of it (required pod affinity on the group label). Empty: no requirement.")
    exclusive: bool = Field(
        default=False,
        description="With topologyKey: a group owns its domain; no other group's rank pods may land in it.")

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            ("!has(self.exclusive) || !self.exclusive || (has(self.topologyKey) && self.topologyKey != '')",
             "placement.exclusive needs placement.topologyKey"),
            ("!has(self.queueName) || self.queueName == '' || (has(self.gang) && self.gang in ['kueue', 'volcano'])",
             "placement.queueName needs placement.gang kueue or volcano"),
        ),
    )

    @model_validator(mode="after")
    def _exclusive_needs_topology(self) -> Placement:
        # Mirrors the CEL rules above so files checked by the CLI fail the same way.
        if self.exclusive and not self.topology_key:
            raise ValueError("placement.exclusive needs placement.topologyKey")
        if self.queue_name and self.gang not in ("kueue", "volcano"):
            raise ValueError("placement.queueName needs placement.gang kueue or volcano")
        return self


class Restart(_Spec):
    """Budget for recreating a broken rank group."""

    max_group_restarts: int = Field(default=5, alias="maxGroupRestarts", ge=0)
    window_seconds: int = Field(default=3600, alias="windowSeconds", ge=1)
    backoff_seconds: int = Field(default=10, alias="backoffSeconds", ge=0)
    max_startup_restarts: int = Field(
        default=3, alias="maxStartupRestarts", ge=0,
        description="Restarts of a group that never became Ready (a load that ran past its startup probe, "
                    "a failed join), counted apart from maxGroupRestarts within the same window.")
    collective_timeout_seconds: int = Field(
        default=120, alias="collectiveTimeoutSeconds", ge=5, le=3600,
        description="A rank waiting longer than this in one collective of a step (or a step making no "
                    "progress) logs the collective, group and peer, fails liveness and exits: the group "
                    "is recreated within the restart budget.")


class Startup(_Spec):
    """How long a pod may take from start to its group joined (the startupProbe)."""

    load_rate_mb_per_second: float = Field(
        default=200.0, alias="loadRateMBps", gt=0,
        description="Read rate of the weights each rank may count on (MB/s, 10^6 bytes); sizes the startupProbe.")
    timeout_seconds: int | None = Field(
        default=None, alias="timeoutSeconds", ge=30,
        description="Override: the startupProbe's whole budget in seconds (else sized from the plan's weight "
                    "bytes per GPU and loadRateMBps).")


class Rollout(_Spec):
    """How many groups may be down at once during a template change."""

    max_unavailable_groups: int = Field(default=1, alias="maxUnavailableGroups", ge=1)


class LargeModelSpec(_Spec):
    """What the user asks for."""

    model: ModelSource
    parallelism: Parallelism = Field(default_factory=Parallelism)
    replicas: int = Field(default=1, ge=0, description="Model replicas = rank groups (data parallel).")
    gpu: Gpu = Field(default_factory=Gpu)
    engine: Literal["native", "deepspeed"] = "native"
    image: str = Field(default="largemodel-runtime:0.1.0", min_length=1)
    serving: Serving = Field(default_factory=Serving)
    placement: Placement = Field(default_factory=Placement)
    restart: Restart = Field(default_factory=Restart)
    rollout: Rollout = Field(default_factory=Rollout)
    startup: Startup = Field(default_factory=Startup)

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=_cel(
            (
                "!has(self.parallelism) || !has(self.gpu) || type(self.parallelism.tensor) == string "
                "|| self.parallelism.tensor <= self.gpu.perNode",
                "parallelism.tensor must be <= gpu.perNode: tensor parallelism never crosses a node",
            ),
            (
                "!has(self.engine) || self.engine != 'deepspeed' || !has(self.model.quantization) "
                "|| self.model.quantization == 'none'",
                "model.quantization needs engine native: DeepSpeed AutoTP has no quantized kernels here",
            ),
        ),
    )

    @model_validator(mode="after")
    def _quantization_needs_native(self) -> LargeModelSpec:
        # Mirrors the CEL rule above so files checked by the CLI fail the same way.
        problem = modelfacts.quantization_problem(quantization=self.model.quantization, engine=self.engine)
        if problem:
            raise ValueError(problem)
        return self


class Condition(BaseModel):
    """A status condition as Kubernetes conventions define it."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = Field(default=None, alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")


class RejectedLayout(BaseModel):
    """A layout the planner considered and why it was rejected."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    tensor: int
    pipeline: int
    why: str


class PlanStatus(BaseModel):
    """The chosen layout as written in status.plan."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    tensor: int
    pipeline: int
    gpus_per_group: int = Field(alias="gpusPerGroup")
    layers_per_stage: list[int] = Field(alias="layersPerStage")
    weight_gib_per_gpu: float = Field(alias="weightGiBPerGPU")
    kv_cache_gib_per_gpu: float = Field(default=0.0, alias="kvCacheGiBPerGPU")
    kv_cache_blocks: int = Field(
        default=0, alias="kvCacheBlocks",
        description="KV cache blocks (16 tokens each) per rank: the plan's KV memory, maxBatchSize x "
                    "ceil(maxModelLen / 16).")
    bubble: float
    parameters: float | None = Field(default=None, description="The parameter count the memory plan used.")
    parameters_source: str | None = Field(
        default=None, alias="parametersSource",
        description="spec: spec.model.architecture.parameters; shapes: computed from the architecture's shapes.")
    quantization: str | None = Field(default=None, description="spec.model.quantization the memory plan used.")
    weight_bytes_per_param: float | None = Field(
        default=None, alias="weightBytesPerParam",
        description="Weight bytes per parameter as served, averaged over the whole model (quantization scales "
                    "included; embeddings, LM head and norms in dtype).")
    warnings: list[str] = Field(default_factory=list)
    rejected: list[RejectedLayout] = Field(default_factory=list)


class GroupState(enum.StrEnum):
    """status.groups[].state: where one rank group is. reconcile.py decides it each pass; the operator's
    largemodel_operator_groups gauge sums it (operator/controller.py). The CRD keeps a plain string."""

    PENDING = "Pending"  # no StatefulSet observed yet
    STARTING = "Starting"  # created or recreated, not every pod Ready yet
    READY = "Ready"
    UPDATING = "Updating"  # an outdated revision being replaced (rolling, one group at a time)
    RESTARTING = "Restarting"  # a failed group being deleted to be recreated within the budget
    TERMINATING = "Terminating"  # scaled away, or its StatefulSet is going
    DOWN = "Down"  # the restart budget is spent: left as it is, the model is Degraded


class GroupLifecycle(BaseModel):
    """When this incarnation of the group passed each step of its start, and the seconds between."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    uid: str | None = Field(default=None, description="The StatefulSet these times belong to.")
    created_at: str | None = Field(default=None, alias="createdAt")
    scheduled_at: str | None = Field(default=None, alias="scheduledAt", description="Every pod bound to a node.")
    started_at: str | None = Field(default=None, alias="startedAt", description="Every container running.")
    loaded_at: str | None = Field(default=None, alias="loadedAt", description="Every pod's startupProbe passed.")
    ready_at: str | None = Field(default=None, alias="readyAt")
    seconds: dict[str, float] | None = Field(
        default=None, description="scheduling, image, load, join, total and recovery, as far as known.")
    load_rate_mb_per_second: float | None = Field(default=None, alias="loadRateMBps")


class GroupStatus(BaseModel):
    """One rank group as status.groups reports it."""

    # `state` holds a GroupState value. Fields added after the first release have no default, so
    # the API server fills nothing in and an unchanged pass equals the stored status (no writes).
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    index: int
    ready: bool = False
    restarts: int = 0
    revision: str = ""
    state: str = ""
    start_phase: str | None = Field(default=None, alias="startPhase",
                                    description="Scheduling, Pulling, Loading n%, Joining or Ready.")
    ready_once: bool | None = Field(default=None, alias="readyOnce",
                                    description="This revision has been Ready: later restarts spend the crash budget.")
    startup_restarts: int | None = Field(default=None, alias="startupRestarts",
                                         description="Restarts before the group's first Ready (their own budget).")
    lifecycle: GroupLifecycle | None = None


class LargeModelStatus(BaseModel):
    """What the operator observed, written once per reconcile pass."""

    # reconcile.py builds every status through this model (extra fields forbidden), so nothing it
    # writes is a field the CRD's structural schema lacks, which the API server would prune.
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    phase: Literal["Pending", "Deploying", "Ready", "Degraded", "Failed"] | None = None
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: list[Condition] = Field(default_factory=list)
    plan: PlanStatus | None = None
    replicas: int = 0
    ready_replicas: int = Field(default=0, alias="readyReplicas")
    selector: str = ""
    groups: list[GroupStatus] = Field(default_factory=list)
    endpoint: str = ""
    revision: str = ""
    gang: GangMode | None = Field(default=None, description="The gang mode whose PodGroups exist (for clean-up).")


class ObjectMeta(BaseModel):
    """The metadata fields the operator reads."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    # The name is also the client Service's name, so it must be a DNS-1035 label; 40 characters
    # leave room for the suffixes children add (-ranks, -g<i>-<ordinal>, revision hashes).
    name: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LargeModel(BaseModel):
    """A whole LargeModel resource."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["serving.largemodel.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["LargeModel"] = KIND
    metadata: ObjectMeta
    spec: LargeModelSpec
    status: LargeModelStatus | None = None

    @classmethod
    def from_manifest(cls, body: dict[str, Any]) -> LargeModel:
        """Parse a resource as read from a file or the API server.

        The status is the operator's own output (the status subresource owns it): it never makes a
        spec invalid, so it is not parsed here."""
        return cls.model_validate({k: v for k, v in body.items() if k != "status"})
