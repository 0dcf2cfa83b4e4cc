"""A real Prometheus server for tests: own config and data dir on 127.0.0.1, bounded lifetime.

The server runs under coreutils `timeout`, so even a test run killed before its teardown cannot
leave a Prometheus behind for longer than `lifetime_s`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from largemodel.runtime.local import NotReadyError, free_port, wait_ready

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScrapeTarget:
    """One scrape job: a host:port serving /metrics, plus the target labels a PodMonitor would add."""

    job: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    honor_labels: bool = False
    path: str = "/metrics"


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error, or did not come up."""


def scrape_config(targets: list[ScrapeTarget], interval_s: int = 1, rule_files: list[Path] | None = None) -> dict[str, Any]:
    """The prometheus.yml for `targets`, scraped (and `rule_files` evaluated) every `interval_s` seconds."""
    return {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(path) for path in rule_files or []],
        "scrape_configs": [
            {
                "job_name": target.job,
                "metrics_path": target.path,
                "honor_labels": target.honor_labels,
                "static_configs": [{"targets": [target.address], "labels": dict(target.labels)}],
            }
            for target in targets
        ],
    }


@dataclass
class Prometheus:
    """A started Prometheus and how to ask it things."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query through /api/v1/query; return its vector (or scalar as one sample)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"query failed: {body.get('errorType')}: {body.get('error')}\n  expr: {expr}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PrometheusError(f"expected an instant vector, got {data['resultType']} for {expr}")
        return list(data["result"])

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of `label` over series matching `match`, as Grafana's label_values() asks for them."""
        params = {"match[]": match} if match else None
        response = httpx.get(f"{self.url}/api/v1/label/{label}/values", params=params, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"label values failed: {body.get('error')} (label={label} match={match})")
        return sorted(body["data"])

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded alerting/recording rule with its health, last error and (alerts) state."""
        body = httpx.get(f"{self.url}/api/v1/rules", timeout=10.0).json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def targets_up(self) -> dict[str, str]:
        """Scrape URL -> health ('up', 'down', 'unknown') of every active target."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0).json()
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll `expr` until it returns at least one sample; raise after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data for {expr} after {timeout_s:.0f}s; targets: {self.targets_up()}")
            time.sleep(0.5)

    def server_log(self) -> str:
        """Prometheus's own log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    try:
        wait_ready(f"{url}/-/ready", [process], timeout_s, poll_s=0.2)
    except NotReadyError as err:
        raise PrometheusError(f"prometheus: {err}:\n{log_path.read_text()[-3000:]}") from None


@contextlib.contextmanager
def running_prometheus(
    targets: list[ScrapeTarget], workdir: Path, lifetime_s: int = 240, interval_s: int = 1,
    rule_files: list[Path] | None = None,
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `targets` (and evaluating `rule_files`) with config and TSDB under
    `workdir`; kill it on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("the prometheus server is not installed (apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(targets, interval_s, rule_files)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    command = [
        "timeout", "--signal=KILL", str(lifetime_s), binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    log.info("prometheus starting url=%s targets=%s", url, [t.address for t in targets])
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, process, log_path, timeout_s=30.0)
        yield Prometheus(url=url, process=process, log_path=log_path)
    finally:
        # The process group holds `timeout` and Prometheus under it: killing only `timeout` would
        # orphan the server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        log.info("prometheus stopped url=%s", url)
