"""The KV cache's metrics: what the paged cache reports, in the units the model-server protocol defines.

The engine's cache calls these from the process that runs the scheduler (global rank 0), once per
event: every rank holds the same block table, so a call per rank would count a lookup `tp x pp`
times. Semantics (docs/OBSERVABILITY.md#gateway-and-autoscaler-metrics):
- kv_usage: blocks holding KV of a running or waiting request over all blocks. Cached blocks that
  no request references (kept only for reuse, evictable) do not count: they are free for a new request.
- prefix_lookup: one call per admitted request, with the prompt tokens looked up and those whose KV
  was found cached (full blocks only, so a multiple of the block size).
"""

from __future__ import annotations

from largemodel import metrics


def kv_usage(used_blocks: int, total_blocks: int) -> float:
    """Set the KV-cache utilization gauge to used/total (0..1) and return it."""
    if total_blocks <= 0:
        raise ValueError(f"total_blocks must be positive, got {total_blocks}")
    if not 0 <= used_blocks <= total_blocks:
        raise ValueError(f"used_blocks must be in [0, {total_blocks}], got {used_blocks}")
    ratio = used_blocks / total_blocks
    metrics.KV_CACHE_USAGE.set(ratio)
    return ratio


def prefix_lookup(query_tokens: int, hit_tokens: int) -> None:
    """Count one prefix-cache lookup: `query_tokens` prompt tokens asked, `hit_tokens` of them cached."""
    if query_tokens < 0 or not 0 <= hit_tokens <= query_tokens:
        raise ValueError(f"need 0 <= hit_tokens <= query_tokens, got hits={hit_tokens} queries={query_tokens}")
    metrics.PREFIX_CACHE_QUERIES.inc(query_tokens)
    metrics.PREFIX_CACHE_HITS.inc(hit_tokens)


def publish_counters() -> None:
    """Put the prefix counters on /metrics at 0 before the first lookup (a rate over them is then 0, not absent).

    prometheus_client's multiprocess mode writes a counter only once it is incremented.
    """
    metrics.PREFIX_CACHE_QUERIES.inc(0)
    metrics.PREFIX_CACHE_HITS.inc(0)


def cache_config(block_size: int, num_blocks: int, prefix_cache: bool) -> None:
    """Publish the cache geometry once at start (cache_config_info, constant 1)."""
    metrics.CACHE_CONFIG_INFO.labels(block_size=str(block_size), num_gpu_blocks=str(num_blocks),
                                     prefix_cache="true" if prefix_cache else "false").set(1)
