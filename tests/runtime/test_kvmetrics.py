"""runtime/kvmetrics: the KV-utilization gauge and the prefix-cache counters, in protocol units."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from largemodel.runtime import kvmetrics


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    value = REGISTRY.get_sample_value(name, labels or {})
    assert value is not None, f"{name} not in the registry"
    return value


def test_kv_usage_is_a_fraction_of_blocks() -> None:
    assert kvmetrics.kv_usage(3, 12) == 0.25
    assert _value("largemodel_kv_cache_usage_ratio") == 0.25
    kvmetrics.kv_usage(12, 12)
    assert _value("largemodel_kv_cache_usage_ratio") == 1.0
    kvmetrics.kv_usage(0, 12)
    assert _value("largemodel_kv_cache_usage_ratio") == 0.0
    for used, total in ((13, 12), (-1, 12), (0, 0)):
        with pytest.raises(ValueError):
            kvmetrics.kv_usage(used, total)


def test_prefix_lookup_counts_tokens_queried_and_hit() -> None:
    queries0, hits0 = _value("largemodel_prefix_cache_queries_total"), _value("largemodel_prefix_cache_hits_total")
    kvmetrics.prefix_lookup(100, 96)
    kvmetrics.prefix_lookup(40, 0)
    assert _value("largemodel_prefix_cache_queries_total") - queries0 == 140
    assert _value("largemodel_prefix_cache_hits_total") - hits0 == 96
    with pytest.raises(ValueError):
        kvmetrics.prefix_lookup(10, 11)
    assert _value("largemodel_prefix_cache_queries_total") - queries0 == 140


def test_cache_config_labels_carry_the_geometry() -> None:
    kvmetrics.cache_config(16, 2048, True)
    assert _value("largemodel_cache_config_info",
                  {"block_size": "16", "num_gpu_blocks": "2048", "prefix_cache": "true"}) == 1
