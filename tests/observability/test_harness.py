"""The Prometheus harness and the dashboard reader, checked on a /metrics this test serves itself.

Only a check of the test tools: the dashboards themselves run against the real runtime in
test_live_deployment.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from largemodel.runtime.local import free_port
from tests.support.grafana import load_dashboards, panel_queries, query_variables, substitute
from tests.support.metricnames import exported_sample_names, metric_names_in
from tests.support.promserver import PrometheusError, ScrapeTarget, running_prometheus

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus server missing")


@needs_prometheus
def test_prometheus_scrapes_and_answers(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    tokens = Counter("largemodel_generation_tokens_total", "tokens", registry=registry)
    waiting = Gauge("largemodel_requests_waiting", "waiting", registry=registry)
    tokens.inc(42)
    waiting.set(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        target = ScrapeTarget("harness", f"127.0.0.1:{port}", {"namespace": "ns1", "largemodel": "m1"})
        with running_prometheus([target], tmp_path / "prom", lifetime_s=60) as prom:
            result = prom.wait_for('largemodel_generation_tokens_total{largemodel="m1"}', timeout_s=20)
            assert float(result[0]["value"][1]) == 42.0
            assert result[0]["metric"]["namespace"] == "ns1"
            assert prom.label_values("largemodel", "largemodel_requests_waiting") == ["m1"]
            assert prom.query("sum(largemodel_requests_waiting)")[0]["value"][1] == "3"
            assert prom.query("scalar(vector(7))")[0]["value"][1] == "7"
            assert prom.query('largemodel_requests_waiting{largemodel="nope"}') == []
            with pytest.raises(PrometheusError, match="parse error"):
                prom.query("sum(")
            process = prom.process
        assert process.poll() is not None, "prometheus outlived its context"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_substitute_handles_grafana_variable_forms() -> None:
    expr = 'rate(x{a=~"$ns", b=~"${model}", c="[[ns]]", d=~"${model:regex}"}[$__rate_interval])'
    assert substitute(expr, {"ns": "n", "model": "m"}, "5m") == 'rate(x{a=~"n", b=~"m", c="n", d=~"m"}[5m])'
    with pytest.raises(KeyError, match="unknown"):
        substitute("x{a=$unknown}", {}, "1m")


def test_dashboards_are_well_formed() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) >= {"overview", "parallelism"}
    known = exported_sample_names()
    uids = [d["uid"] for d in dashboards.values()]
    assert len(uids) == len(set(uids))
    for name, dashboard in dashboards.items():
        json.dumps(dashboard)
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "namespace", "model"} <= variables, name
        assert [v.name for v in query_variables(dashboard)] == ["namespace", "model"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}/{panel['title']} is wider than the grid"
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                assert panel.get("description"), f"{name}/{panel['title']} has no description"
        queries = panel_queries(name, dashboard)
        assert queries, name
        for query in queries:
            used = metric_names_in(query.expr)
            assert used and used <= known, f"{query.name} uses undeclared {sorted(used - known)}"
    # Quantile panels keep `le` in their aggregation, or histogram_quantile returns nothing.
    for query in (q for n, d in dashboards.items() for q in panel_queries(n, d)):
        if "histogram_quantile" in query.expr:
            assert "by (le" in query.expr, query.name


def test_required_panels_exist() -> None:
    """What issue 7 asks each dashboard to show, by the metric that shows it."""
    dashboards = load_dashboards()
    exprs = {name: " ".join(q.expr for q in panel_queries(name, d)) for name, d in dashboards.items()}
    for metric in ("requests_total", "time_to_first_token_seconds_bucket", "request_duration_seconds_bucket",
                   "inter_token_latency_seconds_bucket", "generation_tokens_total", "requests_waiting",
                   "kv_cache_usage_ratio"):
        assert f"largemodel_{metric}" in exprs["overview"], metric
    for metric in ("collective_seconds_bucket", "collective_bytes_total", "collective_calls_total",
                   "pipeline_bubble_ratio", "stage_step_seconds_bucket", "operator_group_restarts_total",
                   "operator_groups"):
        assert f"largemodel_{metric}" in exprs["parallelism"], metric
