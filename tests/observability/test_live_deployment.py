"""A real tp=2, pp=2 rank group under a bounded load, scraped by a real Prometheus.

- The collective counters move by exactly the calls and bytes the engine's design implies per
  generated token (docs/OBSERVABILITY.md, "Collectives per generated token").
- `promtool check metrics` accepts the real /metrics body of every pod.
- Every dashboard panel's query, run through Prometheus's HTTP API, returns data.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections import Counter as Tally
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from largemodel.runtime.model import BLOCK_SIZE
from largemodel.runtime.pipeline import HEADER_LEN, META_COLS
from tests.support.grafana import load_dashboards, panel_queries, query_variables, substitute
from tests.support.operator_target import OperatorTarget, running_operator_target
from tests.support.paths import REPO
from tests.support.promserver import Prometheus, ScrapeTarget, running_prometheus
from tests.support.rankgroup import RankGroup, running_rank_group
from tests.support.tiny_models import build_tiny_llama

pytestmark = [
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                       reason="prometheus/promtool missing: scripts/setup.sh dev installs them"),
    pytest.mark.timeout(240),
]

ALERT_RULES = REPO / "charts" / "largemodel" / "files" / "alerts.rules.yaml"
NAMESPACE = "observability"  # the target labels the chart's PodMonitor would add
LOAD_REQUESTS = 12
LOAD_CONCURRENCY = 4
TP, PP = 2, 2
LAYERS = 5  # odd, so pp=2 splits it unevenly (3 + 2) and per-stage counts differ


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=LAYERS)


@pytest.fixture(scope="module")
def group(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankGroup]:
    with running_rank_group(model_dir, tmp_path_factory.mktemp("group"), tp=TP, pp=PP) as running:
        yield running


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorTarget]:
    with running_operator_target(tmp_path_factory.mktemp("operator"), NAMESPACE, "tiny") as target:
        yield target


@pytest.fixture(scope="module")
def prometheus(group: RankGroup, operator: OperatorTarget,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    targets = [
        ScrapeTarget(f"pod-{stage}", f"127.0.0.1:{port}",
                     {"namespace": NAMESPACE, "largemodel": group.name, "pod": group.pod(stage)})
        for stage, port in enumerate(group.metrics_ports)
    ]
    # The operator's series carry the LargeModel's namespace/name themselves (honor_labels, as
    # docs/OBSERVABILITY.md asks of the operator's ServiceMonitor).
    targets.append(ScrapeTarget("operator", operator.address, {}, honor_labels=True))
    workdir = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(targets, workdir, lifetime_s=200, rule_files=[ALERT_RULES]) as prom:
        yield prom


def _complete(url: str, prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60.0)
        response.raise_for_status()
        return dict(response.json())
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60.0) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[len("data: "):]).get("usage") or usage
    return {"usage": usage}


@dataclass(frozen=True)
class Load:
    """What the bounded load did."""

    requests: int
    completion_tokens: int


@pytest.fixture(scope="module")
def loaded(group: RankGroup, prometheus: Prometheus) -> Load:
    """LOAD_REQUESTS completions, LOAD_CONCURRENCY at a time, half of them streamed; then wait
    until Prometheus has scraped the end state."""
    prometheus.wait_for(f'largemodel_rank_info{{largemodel="{group.name}"}}', timeout_s=30)
    prompts = [f"def function_{i}(value):\n    return json.dumps(value)" for i in range(LOAD_REQUESTS)]
    with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
        results = list(pool.map(lambda i: _complete(group.http_url, prompts[i], 4 + i % 5, stream=i % 2 == 1),
                                range(LOAD_REQUESTS)))
    tokens = sum(int(r["usage"]["completion_tokens"]) for r in results)
    assert tokens == sum(4 + i % 5 for i in range(LOAD_REQUESTS))
    prometheus.wait_for(f'sum(largemodel_requests_total{{largemodel="{group.name}"}}) >= {LOAD_REQUESTS}',
                        timeout_s=30)
    return Load(LOAD_REQUESTS, tokens)


def _collective_totals(group: RankGroup) -> Tally[tuple[str, str, str]]:
    """(sample, op, group) -> value summed over every pod of the group, from a fresh scrape."""
    totals: Tally[tuple[str, str, str]] = Tally()
    for stage in range(group.pp):
        for family in text_string_to_metric_families(group.scrape(stage)):
            for sample in family.samples:
                if sample.name in ("largemodel_collective_calls_total", "largemodel_collective_bytes_total"):
                    totals[(sample.name, sample.labels["op"], sample.labels["group"])] += int(sample.value)
                elif sample.name == "largemodel_stage_step_seconds_count":
                    totals[(sample.name, sample.labels["phase"], "stage" + sample.labels["stage"])] += int(sample.value)
    return totals


def expected_collectives(tp: int, pp: int, layers: int, hidden: int, vocab: int, widths: list[int],
                         element: int = 4) -> Tally[tuple[str, str, str]]:
    """Calls and bytes, summed over all ranks, of forwards of one row with `widths` tokens each, one after
    another in one sequence from position 0."""
    calls, nbytes = "largemodel_collective_calls_total", "largemodel_collective_bytes_total"
    want: Tally[tuple[str, str, str]] = Tally()
    position = 0
    for w in widths:
        position += w
        table = -(-position // BLOCK_SIZE)  # the row's KV block table covers every position so far
        plan = 8 * HEADER_LEN + 8 * (META_COLS + w + table)  # header + payload (metadata, tokens, blocks), int64
        want[(calls, "all_reduce", "tp")] += tp * (2 * layers + 1)  # 2 per layer + vocab-parallel embedding
        want[(nbytes, "all_reduce", "tp")] += tp * (2 * layers + 1) * w * hidden * element
        want[(calls, "all_gather", "tp")] += tp  # vocab-parallel LM head, last token only
        want[(nbytes, "all_gather", "tp")] += tp * -(-vocab // tp) * 4
        want[(calls, "broadcast", "tp")] += 2 * tp  # the step plan to stage 0's TP ranks
        want[(nbytes, "broadcast", "tp")] += tp * plan
        for op in ("send", "recv"):
            want[(calls, op, "pp")] += 3 * tp * (pp - 1) + 1  # plan + hidden per boundary, tokens back
            want[(nbytes, op, "pp")] += tp * (pp - 1) * (plan + w * hidden * element) + 8
    return want


def test_collectives_per_generated_token_match_layers_and_tp(group: RankGroup, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    for prompt, max_tokens in (("import json", 5), ("def dumps(obj, *, skipkeys=False):\n    return obj", 9)):
        before = _collective_totals(group)
        usage = _complete(group.http_url, prompt, max_tokens)["usage"]
        after = _collective_totals(group)
        generated, prompt_len = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
        assert generated == max_tokens
        delta = Tally({key: after[key] - before[key] for key in after if after[key] != before[key]})
        # One forward per generated token: a prefill of the prompt, then single-token decodes.
        widths = [prompt_len] + [1] * (generated - 1)
        want = expected_collectives(TP, PP, LAYERS, config["hidden_size"], config["vocab_size"], widths)
        steps = {k: v for k, v in delta.items() if k[0] == "largemodel_stage_step_seconds_count"}
        collectives = {k: v for k, v in delta.items() if k[0] != "largemodel_stage_step_seconds_count"}
        assert collectives == dict(want), f"prompt of {prompt_len} tokens, {generated} generated"
        per_token = delta[("largemodel_collective_calls_total", "all_reduce", "tp")] / generated
        assert per_token == TP * (2 * LAYERS + 1)
        # Every rank times every micro-batch it runs: tp ranks per stage, one prefill, the rest decode.
        assert steps == {
            **{("largemodel_stage_step_seconds_count", "prefill", f"stage{s}"): TP for s in range(PP)},
            **{("largemodel_stage_step_seconds_count", "decode", f"stage{s}"): TP * (generated - 1) for s in range(PP)},
        }


def test_promtool_check_metrics_on_real_scrapes(group: RankGroup, loaded: Load, operator: OperatorTarget) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    bodies = {f"stage {stage}": group.scrape(stage) for stage in range(group.pp)}
    bodies["operator"] = httpx.get(f"http://{operator.address}/metrics", timeout=10.0).text
    for stage in range(group.pp):
        assert "largemodel_collective_calls_total" in bodies[f"stage {stage}"]
        assert "largemodel_rank_info" in bodies[f"stage {stage}"]
    assert "largemodel_time_to_first_token_seconds_bucket" in bodies["stage 0"]
    assert "largemodel_operator_reconcile_seconds_bucket" in bodies["operator"]
    for source, body in bodies.items():
        result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
            f"{source}: {result.stdout}{result.stderr}"
        )


def test_alert_rules_evaluate_on_real_series(prometheus: Prometheus, loaded: Load, operator: OperatorTarget) -> None:
    """The rule file loads into the real Prometheus, every rule evaluates cleanly against the real
    series, and the operator's failed group fires LargeModelRestartBudgetExhausted end to end."""
    operator.wait_until_exercised()
    deadline = time.monotonic() + 30
    while True:
        rules = {rule["name"]: rule for rule in prometheus.rules()}
        fired = rules.get("LargeModelRestartBudgetExhausted", {}).get("state") == "firing"
        pending = rules.get("LargeModelGroupsUnavailable", {}).get("state") == "pending"
        healthy = rules and all(rule["health"] == "ok" for rule in rules.values())
        if fired and pending and healthy:
            break
        if time.monotonic() > deadline:
            states = {name: (r["health"], r.get("state"), r.get("lastError")) for name, r in rules.items()}
            raise AssertionError(f"rules did not reach the expected states: {states}")
        time.sleep(0.5)
    assert len(rules) == sum(len(group["rules"]) for group in yaml.safe_load(ALERT_RULES.read_text())["groups"])
    (alert,) = rules["LargeModelRestartBudgetExhausted"]["alerts"]
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "1 LargeModel rank groups exhausted their restart budget"


def _variable_values(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Resolve the dashboard's variables through Prometheus as Grafana does, first value of each."""
    values: dict[str, str] = {}
    for variable in query_variables(dashboard):
        match = substitute(variable.match, values, "1m") if variable.match else None
        found = prometheus.label_values(variable.label, match)
        assert found, f"variable ${variable.name} has no values (label_values({match}, {variable.label}))"
        values[variable.name] = found[0]
    return values


def test_every_dashboard_panel_query_returns_data(prometheus: Prometheus, loaded: Load, group: RankGroup,
                                                  operator: OperatorTarget) -> None:
    operator.wait_until_exercised()
    prometheus.wait_for('largemodel_operator_groups{state="failed"} > 0', timeout_s=30)
    prometheus.wait_for("largemodel_operator_group_restarts_total > 0", timeout_s=30)
    # Reconcile-time quantiles are NaN until two scrapes of the operator straddle a reconcile pass
    # (resyncs come every 5 s): wait for that rather than for a fixed time.
    prometheus.wait_for("rate(largemodel_operator_reconcile_seconds_count[5m]) > 0", timeout_s=30)
    time.sleep(2)  # two more scrapes of the operator, so its counters have a rate
    failures = []
    checked = 0
    for name, dashboard in load_dashboards().items():
        values = _variable_values(prometheus, dashboard)
        assert values == {"namespace": NAMESPACE, "model": group.name}
        # One window that spans the whole test run stands in for $__rate_interval.
        for query in panel_queries(name, dashboard):
            expr = substitute(query.expr, values, "5m")
            result = prometheus.query(expr)
            finite = [s for s in result if not math.isnan(float(s["value"][1])) and math.isfinite(float(s["value"][1]))]
            checked += 1
            if not finite:
                failures.append(f"{query.name}: {len(result)} samples, none finite\n    {expr}")
    assert not failures, f"{len(failures)} of {checked} panel queries returned no data:\n" + "\n".join(failures)
