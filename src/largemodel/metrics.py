"""Every Prometheus metric largemodel exports, declared once (docs/DESIGN.md#metrics).

docs/OBSERVABILITY.md is the reference (type, labels, meaning). Gauges name a
`multiprocess_mode` because a pod's local ranks write one prometheus_client multiprocess
directory and its /metrics merges them: without a mode every gauge would grow a `pid` label.
The label values the dashboards and alert rules select on are declared here too.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "largemodel_"

# Request latencies of LLM serving span milliseconds (inter-token) to minutes (long generations).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# Collectives: tens of microseconds (small NCCL all-reduce) to seconds (a stuck peer).
_COLLECTIVE_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)

# `status` of requests_total. The alert rules and dashboards select on these values.
STATUS_OK = "ok"  # finished normally (stop token, stop string or max_tokens)
STATUS_REJECTED = "rejected"  # refused because the queue was full (HTTP 429 / RESOURCE_EXHAUSTED)
STATUS_INVALID = "invalid"  # refused as bad input (HTTP 4xx other than 429)
STATUS_CANCELLED = "cancelled"  # the client went away or the server drained it on shutdown
STATUS_ERROR = "error"  # failed inside the server (HTTP 5xx)
REQUEST_STATUSES = (STATUS_OK, STATUS_REJECTED, STATUS_INVALID, STATUS_CANCELLED, STATUS_ERROR)

# `state` of operator_groups, one gauge sample per state (0 when no group is in it).
GROUP_READY = "ready"  # every pod of the group Ready
GROUP_PROGRESSING = "progressing"  # being created or rolled out, not Ready yet
GROUP_RESTARTING = "restarting"  # recreated after a failure, or waiting out its backoff
GROUP_FAILED = "failed"  # restart budget exhausted: left down, LargeModel Degraded
GROUP_STATES = (GROUP_READY, GROUP_PROGRESSING, GROUP_RESTARTING, GROUP_FAILED)

# `op` and `group` of the collective metrics.
COLLECTIVE_OPS = ("all_reduce", "all_gather", "send", "recv", "broadcast")
COLLECTIVE_GROUPS = ("tp", "pp")

REQUESTS = Counter(PREFIX + "requests_total", "Finished requests by outcome.", ["status"])
REQUEST_DURATION = Histogram(
    PREFIX + "request_duration_seconds", "Request time from admission to last token.", buckets=_LATENCY_BUCKETS
)
TTFT = Histogram(
    PREFIX + "time_to_first_token_seconds", "Time from admission to the first generated token.",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    PREFIX + "inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
    buckets=_TOKEN_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter(PREFIX + "prompt_tokens_total", "Prompt tokens admitted.")
GENERATION_TOKENS = Counter(PREFIX + "generation_tokens_total", "Tokens generated.")
REQUESTS_RUNNING = Gauge(
    PREFIX + "requests_running", "Requests in the running batch.", multiprocess_mode="livesum"
)
REQUESTS_WAITING = Gauge(
    PREFIX + "requests_waiting", "Requests queued for a batch slot.", multiprocess_mode="livesum"
)
KV_CACHE_USAGE = Gauge(
    PREFIX + "kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", multiprocess_mode="livemax"
)
BATCH_SEQUENCES = Histogram(
    PREFIX + "batch_sequences", "Sequences in each batch the scheduler submits to the engine.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

COLLECTIVE_SECONDS = Histogram(
    PREFIX + "collective_seconds", "Latency of sampled collectives.", ["op", "group", "backend"],
    buckets=_COLLECTIVE_BUCKETS,
)
COLLECTIVE_BYTES = Counter(
    PREFIX + "collective_bytes_total", "Bytes moved by collectives (every call).", ["op", "group", "backend"]
)
COLLECTIVE_CALLS = Counter(
    PREFIX + "collective_calls_total", "Collectives issued (every call).", ["op", "group", "backend"]
)
# The TP ranks of a stage idle alike; the pod reports its most idle rank.
PIPELINE_BUBBLE = Gauge(
    PREFIX + "pipeline_bubble_ratio", "Measured idle fraction of this stage per step.", multiprocess_mode="livemax"
)
STAGE_STEP_SECONDS = Histogram(
    PREFIX + "stage_step_seconds", "Time one stage spends on one engine step.", ["stage", "phase"],
    buckets=_TOKEN_LATENCY_BUCKETS,
)
# The pod is ready when its slowest rank is: report the slowest.
MODEL_LOAD_SECONDS = Gauge(
    PREFIX + "model_load_seconds", "Time this rank took to load its shard.", multiprocess_mode="max"
)
RANK_INFO = Gauge(
    PREFIX + "rank_info", "Constant 1 per rank, labels describe its place in the group.",
    ["rank", "tp_rank", "pp_rank", "tp", "pp", "group", "backend", "engine"],
    multiprocess_mode="livemax",
)

OPERATOR_RECONCILE_SECONDS = Histogram(
    PREFIX + "operator_reconcile_seconds", "Time of one reconcile pass.", buckets=_LATENCY_BUCKETS
)
OPERATOR_GROUP_RESTARTS = Counter(
    PREFIX + "operator_group_restarts_total", "Rank groups recreated after a failure.", ["namespace", "name"]
)
OPERATOR_GROUPS = Gauge(PREFIX + "operator_groups", "Rank groups by state.", ["state"])

# Appended by observability (issue 7): what the queue-saturation alert divides by.
QUEUE_CAPACITY = Gauge(
    PREFIX + "queue_capacity", "Requests that may wait before new ones get 429 (serving.maxQueue).",
    multiprocess_mode="livemax",
)

# Appended by the operator team (issue 4): API requests of the reconcile loop, by verb and resource,
# so writes per reconcile are measurable (a steady state must show no write verbs).
OPERATOR_API_REQUESTS = Counter(
    PREFIX + "operator_api_requests_total", "Kubernetes API requests the reconcile loop made.", ["verb", "resource"]
)
OPERATOR_RECONCILES = Counter(
    PREFIX + "operator_reconciles_total", "Reconcile passes by result (ok, retry, error).", ["result"]
)

# Appended by issue 17: measured lifecycle of rank groups. The operator observes each phase once per
# group incarnation, when it first sees the group Ready (phase: scheduling, image, load, join, total;
# recovery: from the group's last restart to Ready again).
OPERATOR_GROUP_START_SECONDS = Histogram(
    PREFIX + "operator_group_start_seconds", "Time of each phase of a rank group's start, and of its recovery.",
    ["phase"], buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
# Each rank: bytes of its shard / seconds to read them (MB/s, 10^6 bytes), and how far it got.
MODEL_LOAD_RATE = Gauge(
    PREFIX + "model_load_rate_bytes_per_second", "Read rate of this rank's weight load (bytes/s).", ["rank"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_BYTES = Gauge(
    PREFIX + "model_load_bytes", "Bytes of weights this rank read at load.", ["rank"], multiprocess_mode="livemax",
)

# Appended by issue 18: the prefix cache and the paged KV cache, for inference gateways (the Gateway API
# Inference Extension's model-server protocol, llm-d) and autoscalers. requests_waiting, requests_running
# and kv_cache_usage_ratio above are the protocol's TotalQueuedRequests, TotalRunningRequests and
# KVCacheUtilization (a fraction 0..1). Written only through largemodel.runtime.kvmetrics, by the process
# that runs the scheduler (global rank 0): the block table is the same on every rank, so one writer
# counts each lookup once.
PREFIX_CACHE_QUERIES = Counter(
    PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
)
PREFIX_CACHE_HITS = Counter(
    PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV was reused)."
)
# Constant 1; the labels carry the KV cache geometry (the protocol's optional BlockSize, NumGPUBlocks).
CACHE_CONFIG_INFO = Gauge(
    PREFIX + "cache_config_info", "KV cache geometry of this server, as labels.",
    ["block_size", "num_gpu_blocks", "prefix_cache"], multiprocess_mode="livemax",
)
