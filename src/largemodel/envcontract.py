"""The environment contract between the operator and the runtime (DESIGN section 3).

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
DEFAULT_METRICS_PORT = 9100


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

    def as_env(self) -> dict[str, str]:
        """Group-wide variables, NODE_RANK and LWS_WORKER_INDEX excluded (they come per pod)."""
        return {
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
            MICRO_BATCHES: str(self.micro_batches),
            ENGINE: self.engine,
            HTTP_PORT: str(self.http_port),
            GRPC_PORT: str(self.grpc_port),
            METRICS_PORT: str(self.metrics_port),
            MAX_BATCH_SIZE: str(self.max_batch_size),
            MAX_QUEUE: str(self.max_queue),
            MAX_MODEL_LEN: str(self.max_model_len),
            MODEL_NAME: self.model_name,
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
    """What one rank process reads back from its environment."""

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

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> RankEnv:
        """Parse and cross-check the contract; raise EnvContractError naming the bad variable."""
        import os

        env = dict(os.environ if environ is None else environ)

        def need(name: str) -> str:
            value = env.get(name)
            if value is None or value == "":
                raise EnvContractError(f"environment variable {name} is required but not set")
            return value

        def need_int(name: str, minimum: int = 0) -> int:
            return int_variable(env, name, None, minimum)

        parsed = cls(
            master_addr=need(MASTER_ADDR),
            master_port=need_int(MASTER_PORT, 1),
            nnodes=need_int(NNODES, 1),
            node_rank=need_int(NODE_RANK, 0),
            nproc_per_node=need_int(NPROC_PER_NODE, 1),
            world_size=need_int(WORLD_SIZE, 1),
            tp=need_int(TP_SIZE, 1),
            pp=need_int(PP_SIZE, 1),
            group_index=int(env.get(GROUP_INDEX, "0") or 0),
            model_uri=need(MODEL_URI),
            model_dtype=env.get(MODEL_DTYPE, "float32") or "float32",
            micro_batches=int(env.get(MICRO_BATCHES, "1") or 1),
            engine=env.get(ENGINE, "native") or "native",
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
        if parsed.engine not in ("native", "deepspeed"):
            raise EnvContractError(f"{ENGINE}={parsed.engine!r} must be 'native' or 'deepspeed'")
        return parsed

    def global_rank(self, local_rank: int) -> int:
        """RANK = NODE_RANK*tp + LOCAL_RANK: stage-major, so a stage's TP ranks are contiguous."""
        return self.node_rank * self.tp + local_rank
