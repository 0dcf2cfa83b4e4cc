"""Which sample names largemodel.metrics exports, and which ones a PromQL expression uses."""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from largemodel import metrics

_METRIC_NAME = re.compile(r"\blargemodel_[a-z0-9_]+\b")


def declared_metrics() -> dict[str, MetricWrapperBase]:
    """Metric family name -> metric object, for every metric largemodel.metrics declares."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            found[value._name] = value
    return found


def exported_sample_names() -> set[str]:
    """Every sample name the declared metrics can put on /metrics (counters get _total, ...)."""
    names: set[str] = set()
    for name, metric in declared_metrics().items():
        if isinstance(metric, Counter):
            names |= {name + "_total", name + "_created"}
        elif isinstance(metric, Histogram):
            names |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
        elif isinstance(metric, Gauge):
            names.add(name)
    return names


def metric_names_in(expr: str) -> set[str]:
    """largemodel_* names an expression reads."""
    return set(_METRIC_NAME.findall(expr))
