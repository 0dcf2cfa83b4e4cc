"""The environment contract between the operator and the runtime (docs/DESIGN.md#env-contract).

The builders write these variables into every rank pod and the runtime launcher reads them
back; both import the names from here so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
NNODES = "NNODES"
NODE_RANK = "NODE_RANK"
NPROC_PER_NODE = "NPROC_PER_NODE"
WORLD_SIZE = "WORLD_SIZE"
TP_SIZE = "TP_SIZE"
PP_SIZE = "PP_SIZE"
GROUP_INDEX = "GROUP_INDEX"
MODEL_URI = "MODEL_URI"
MODEL_DTYPE = "MODEL_DTYPE"
# spec.model.quantization: none | int8 | q4 | gguf (largemodel.modelfacts.QUANTIZATIONS); unset means none.
MODEL_QUANTIZATION = "MODEL_QUANTIZATION"
MICRO_BATCHES = "MICRO_BATCHES"
ENGINE = "ENGINE"
# Serving settings the runtime needs too (ports, limits); not in LWS, ours only.
HTTP_PORT = "HTTP_PORT"
GRPC_PORT = "GRPC_PORT"
METRICS_PORT = "METRICS_PORT"
MAX_BATCH_SIZE = "MAX_BATCH_SIZE"
MAX_QUEUE = "MAX_QUEUE"
MAX_MODEL_LEN = "MAX_MODEL_LEN"
MODEL_NAME = "MODEL_NAME"
# spec.serving.prefixCache ("1"/"0") and status.plan.kvCacheBlocks (KV blocks per rank, 0: the runtime
# derives them from maxBatchSize x maxModelLen) for the paged KV cache (issue 18).
PREFIX_CACHE = "PREFIX_CACHE"
KV_CACHE_BLOCKS = "KV_CACHE_BLOCKS"
KV_BLOCK_SIZE = 16  # tokens per KV cache block, on every rank
# spec.serving.drainSeconds: how long a SIGTERMed stage 0 lets admitted requests finish (issue 18:
# scale-down and rollouts drain a group before it goes); the other stages wait as long for its SHUTDOWN.
DRAIN_GRACE_SECONDS = "DRAIN_GRACE_SECONDS"
DEFAULT_DRAIN_SECONDS = 30
# After the drain: the pipeline SHUTDOWN, the engine stopping and the ranks exiting.
SHUTDOWN_MARGIN_SECONDS = 30
# The planner's layer split (status.plan.layersPerStage, comma-separated): the runtime checks its own
# split equals it, so a pod never silently serves a different layout than the one planned.
LAYERS_PER_STAGE = "LAYERS_PER_STAGE"
# LeaderWorkerSet aliases so images written for LWS work unchanged.
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"
# Set per process by the launcher, not by the operator.
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
# Where rank-to-rank ports (rendezvous, liveness, p2p) listen, and the group's shared secret.
POD_IP = "POD_IP"  # the operator sets it from status.podIP; rank ports bind it
BIND_HOST = "BIND_HOST"  # API and metrics ports bind it (default 0.0.0.0; `largemodel run`: 127.0.0.1)
GROUP_SECRET_FILE = "GROUP_SECRET_FILE"  # the operator mounts the group Secret and names the file here
GROUP_SECRET = "GROUP_SECRET"  # the secret itself (`largemodel run` only: never in a pod spec)
GROUP_SECRET_MOUNT = "/var/run/largemodel/group"
GROUP_SECRET_KEY = "secret"
# spec.serving.apiKeySecret: the operator mounts key API_KEY_KEY of that Secret and names the file here.
API_KEY_FILE = "API_KEY_FILE"
API_KEY_MOUNT = "/var/run/largemodel/api"
API_KEY_KEY = "apiKey"

DEFAULT_MASTER_PORT = 29500
# The stage-0 supervisor's liveness link listens next to the rendezvous port.
LIVENESS_PORT_OFFSET = 1
# One set of defaults: the API's (operator/api.py Serving takes its defaults from here).
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000
DEFAULT_METRICS_PORT = 9100
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_MODEL_LEN = 8192
ENGINES = ("native", "deepspeed")
QUANTIZATIONS = ("none", "int8", "q4", "gguf")  # the same as largemodel.modelfacts.QUANTIZATIONS


def liveness_port(master_port: int) -> int:
    """The stage-0 supervisor's liveness port: MASTER_PORT + LIVENESS_PORT_OFFSET."""
    return master_port + LIVENESS_PORT_OFFSET


def master_address(name: str, group: int, namespace: str) -> str:
    """DNS name of a group's stage-0 pod through the headless ranks Service."""
    return f"{name}-g{group}-0.{name}-ranks.{namespace}.svc"


_ANY_ADDRESS = ("", "0.0.0.0", "::")


def rank_bind_host(environ: Mapping[str, str]) -> str:
    """Address the rank-to-rank listeners bind: POD_IP in a cluster, else BIND_HOST, else "" (all).

    A pod's API and metrics ports bind every interface (kubelet probes and port-forward need
    them), but nothing outside the group has business with rendezvous, liveness or p2p ports.
    """
    pod_ip = environ.get(POD_IP, "").strip()
    if pod_ip:
        return pod_ip
    host = environ.get(BIND_HOST, "").strip()
    return "" if host in _ANY_ADDRESS else host


def group_secret(environ: Mapping[str, str]) -> bytes | None:
    """The group's shared secret: the file GROUP_SECRET_FILE names, else GROUP_SECRET; None if neither.

    EnvContractError when the file is named but unreadable or empty (a half-mounted Secret must
    not silently turn authentication off).
    """
    path = environ.get(GROUP_SECRET_FILE, "").strip()
    if path:
        try:
            with open(path, "rb") as handle:
                value = handle.read().strip()
        except OSError as err:
            raise EnvContractError(f"environment variable {GROUP_SECRET_FILE}: cannot read the group secret "
                                   f"({err.strerror})") from None
        if not value:
            raise EnvContractError(f"environment variable {GROUP_SECRET_FILE}: the group secret file is empty")
        return value
    text = environ.get(GROUP_SECRET, "").strip()
    return text.encode() if text else None


@dataclass(frozen=True)
class RankGroupEnv:
    """Values that are the same for every pod of one rank group (NODE_RANK comes per pod)."""

    master_addr: str
    master_port: int
    tp: int
    pp: int
    group_index: int
    model_uri: str
    model_dtype: str
    micro_batches: int
    engine: str
    http_port: int
    grpc_port: int
    metrics_port: int
    max_batch_size: int
    max_queue: int
    max_model_len: int
    model_name: str
    layers_per_stage: tuple[int, ...] = ()
    prefix_cache: bool = True
    kv_cache_blocks: int = 0
    model_quantization: str = "none"

    def as_env(self) -> dict[str, str]:
        """Group-wide variables, NODE_RANK and LWS_WORKER_INDEX excluded (they come per pod)."""
        split = {LAYERS_PER_STAGE: ",".join(map(str, self.layers_per_stage))} if self.layers_per_stage else {}
        return split | {
            MASTER_ADDR: self.master_addr,
            MASTER_PORT: str(self.master_port),
            NNODES: str(self.pp),
            NPROC_PER_NODE: str(self.tp),
            WORLD_SIZE: str(self.tp * self.pp),
            TP_SIZE: str(self.tp),
            PP_SIZE: str(self.pp),
            GROUP_INDEX: str(self.group_index),
            MODEL_URI: self.model_uri,
            MODEL_DTYPE: self.model_dtype,
            MODEL_QUANTIZATION: self.model_quantization,
            MICRO_BATCHES: str(self.micro_batches),
            ENGINE: self.engine,
            HTTP_PORT: str(self.http_port),
            GRPC_PORT: str(self.grpc_port),
            METRICS_PORT: str(self.metrics_port),
            MAX_BATCH_SIZE: str(self.max_batch_size),
            MAX_QUEUE: str(self.max_queue),
            MAX_MODEL_LEN: str(self.max_model_len),
            MODEL_NAME: self.model_name,
            PREFIX_CACHE: "1" if self.prefix_cache else "0",
            KV_CACHE_BLOCKS: str(self.kv_cache_blocks),
            LWS_LEADER_ADDRESS: self.master_addr,
            LWS_GROUP_SIZE: str(self.pp),
        }

    def node_env(self, node_rank: int) -> dict[str, str]:
        """Full environment of the pod that runs pipeline stage `node_rank` (local runs use this)."""
        env = self.as_env()
        env[NODE_RANK] = str(node_rank)
        env[LWS_WORKER_INDEX] = str(node_rank)
        return env


class EnvContractError(ValueError):
    """A variable of the contract is missing or inconsistent; the message names it."""


def int_variable(environ: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int:
    """An integer variable: `default` when unset (required when None); EnvContractError naming it otherwise."""
    raw = environ.get(name, "")
    if raw == "":
        if default is None:
            raise EnvContractError(f"environment variable {name} is required but not set")
        raw = str(default)
    try:
        value = int(raw)
    except ValueError:
        raise EnvContractError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise EnvContractError(f"environment variable {name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class RankEnv:
    """Everything a pod reads back from its environment: the one reader of what RankGroupEnv writes."""

    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: int
    world_size: int
    tp: int
    pp: int
    group_index: int
    model_uri: str
    model_dtype: str
    micro_batches: int
    engine: str
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    model_name: str = ""
    layers_per_stage: tuple[int, ...] = ()
    prefix_cache: bool = True
    kv_cache_blocks: int = 0
    model_quantization: str = "none"

    @property
    def liveness_port(self) -> int:
        """Where stage 0's supervisor listens for the other stages."""
        return liveness_port(self.master_port)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RankEnv:
        """Parse and cross-check the contract; raise EnvContractError naming the bad variable."""
        import os

        env = dict(os.environ if environ is None else environ)

        def need(name: str) -> str:
            value = env.get(name)
            if value is None or value == "":
                raise EnvContractError(f"environment variable {name} is required but not set")
            return value

        def number(name: str, default: int | None, minimum: int = 0, maximum: int | None = None) -> int:
            value = int_variable(env, name, default, minimum)
            if maximum is not None and value > maximum:
                raise EnvContractError(f"environment variable {name}={value} must be <= {maximum}")
            return value

        parsed = cls(
            master_addr=need(MASTER_ADDR),
            master_port=number(MASTER_PORT, None, 1, 65535 - LIVENESS_PORT_OFFSET),
            nnodes=number(NNODES, None, 1),
            node_rank=number(NODE_RANK, None, 0),
            nproc_per_node=number(NPROC_PER_NODE, None, 1),
            world_size=number(WORLD_SIZE, None, 1),
            tp=number(TP_SIZE, None, 1),
            pp=number(PP_SIZE, None, 1),
            group_index=number(GROUP_INDEX, 0, 0),
            model_uri=need(MODEL_URI),
            model_dtype=env.get(MODEL_DTYPE, "float32") or "float32",
            micro_batches=number(MICRO_BATCHES, 1, 1),
            engine=env.get(ENGINE, "native") or "native",
            http_port=number(HTTP_PORT, DEFAULT_HTTP_PORT, 1, 65535),
            grpc_port=number(GRPC_PORT, DEFAULT_GRPC_PORT, 1, 65535),
            metrics_port=number(METRICS_PORT, DEFAULT_METRICS_PORT, 0, 65535),
            max_batch_size=number(MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_SIZE, 1),
            max_queue=number(MAX_QUEUE, DEFAULT_MAX_QUEUE, 0),
            max_model_len=number(MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN, 1),
            model_name=env.get(MODEL_NAME, ""),
            layers_per_stage=_layer_split(env.get(LAYERS_PER_STAGE, "")),
            prefix_cache=_flag(env, PREFIX_CACHE, True),
            kv_cache_blocks=number(KV_CACHE_BLOCKS, 0, 0),
            model_quantization=env.get(MODEL_QUANTIZATION, "").strip() or "none",
        )
        if parsed.nproc_per_node != parsed.tp:
            raise EnvContractError(f"{NPROC_PER_NODE}={parsed.nproc_per_node} must equal {TP_SIZE}={parsed.tp}")
        if parsed.nnodes != parsed.pp:
            raise EnvContractError(f"{NNODES}={parsed.nnodes} must equal {PP_SIZE}={parsed.pp}")
        if parsed.world_size != parsed.tp * parsed.pp:
            raise EnvContractError(
                f"{WORLD_SIZE}={parsed.world_size} must equal {TP_SIZE}*{PP_SIZE}={parsed.tp * parsed.pp}"
            )
        if parsed.node_rank >= parsed.nnodes:
            raise EnvContractError(f"{NODE_RANK}={parsed.node_rank} must be < {NNODES}={parsed.nnodes}")
        if parsed.engine not in ENGINES:
            raise EnvContractError(f"{ENGINE}={parsed.engine!r} must be 'native' or 'deepspeed'")
        if parsed.model_quantization not in QUANTIZATIONS:
            raise EnvContractError(f"{MODEL_QUANTIZATION}={parsed.model_quantization!r} must be one of "
                                   f"{', '.join(QUANTIZATIONS)}")
        if parsed.layers_per_stage and len(parsed.layers_per_stage) != parsed.pp:
            raise EnvContractError(f"{LAYERS_PER_STAGE}={env[LAYERS_PER_STAGE]!r} must list {PP_SIZE}={parsed.pp} "
                                   "stages")
        return parsed

    def check_layer_split(self, split: list[int] | tuple[int, ...]) -> None:
        """EnvContractError unless the runtime's own layer split equals the planned one (when shipped)."""
        if self.layers_per_stage and tuple(split) != self.layers_per_stage:
            raise EnvContractError(
                f"{LAYERS_PER_STAGE}={','.join(map(str, self.layers_per_stage))} (the plan) but this runtime "
                f"splits the model as {','.join(map(str, split))}: operator and runtime versions disagree")

    def global_rank(self, local_rank: int) -> int:
        """RANK = NODE_RANK*tp + LOCAL_RANK: stage-major, so a stage's TP ranks are contiguous."""
        return self.node_rank * self.tp + local_rank


def kv_cache_blocks_for(max_batch_size: int, max_model_len: int) -> int:
    """KV blocks per rank that hold maxBatchSize sequences of maxModelLen tokens (the plan's KV memory)."""
    return max_batch_size * -(-max_model_len // KV_BLOCK_SIZE)


def termination_grace_seconds(drain_seconds: int) -> int:
    """terminationGracePeriodSeconds of a rank pod: the drain, then the shutdown margin, before SIGKILL."""
    return drain_seconds + SHUTDOWN_MARGIN_SECONDS


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "")
    if raw == "":
        return default
    if raw not in ("0", "1"):
        raise EnvContractError(f"environment variable {name}={raw!r} must be 1 or 0")
    return raw == "1"


def _layer_split(raw: str) -> tuple[int, ...]:
    if not raw.strip():
        return ()
    try:
        split = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise EnvContractError(f"environment variable {LAYERS_PER_STAGE}={raw!r} is not a comma-separated list of "
                               "integers") from None
    if any(n < 1 for n in split):
        raise EnvContractError(f"environment variable {LAYERS_PER_STAGE}={raw!r}: every stage needs a layer")
    return split
