"""Serving throughput and latency through the real HTTP API: tokens/s at concurrency 1, 4, 16 and TTFT.

Starts `largemodel run` on a copy of a LargeModel file (default examples/smollm2-local.yaml,
maxBatchSize raised to the highest concurrency so nothing queues), then for each concurrency
sends that many streaming completions at once (same length, EOS ignored, so every request
generates exactly --new-tokens) and measures, per round:

- aggregate tokens/s = all generated tokens / wall time from first send to last [DONE]
- TTFT (send -> first streamed token) and inter-token latency, medians over requests

Usage: PYTHONSAFEPATH=1 .venv/bin/python bench/serving_bench.py [--file F] [--concurrency 1 4 16]
       [--new-tokens 64] [--rounds 3] [--micro-batches M] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from largemodel.runtime.local import NotReadyError, free_port, wait_ready

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Request {i}:"


def start_server(lm_file: Path, max_batch: int, micro_batches: int | None,
                 log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`largemodel run` on a copy of `lm_file` with maxBatchSize >= the highest concurrency."""
    doc = yaml.safe_load(lm_file.read_text())
    if micro_batches is not None:
        doc["spec"].setdefault("parallelism", {})["microBatches"] = micro_batches
    serving = doc["spec"].setdefault("serving", {})
    serving["maxBatchSize"] = max(max_batch, int(serving.get("maxBatchSize", 1)))
    serving["maxQueue"] = max(max_batch, int(serving.get("maxQueue", 0)))
    copy = log_path.with_suffix(".yaml")
    copy.write_text(yaml.safe_dump(doc))
    port = free_port()
    cmd = [sys.executable, "-m", "largemodel.operator.cli", "run", "-f", str(copy), "--port", str(port),
           "--grpc-port", "0"]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", [proc], 600, poll_s=0.5)
    except NotReadyError as err:
        if proc.poll() is None:
            proc.kill()
        raise SystemExit(f"largemodel run: {err}; log: {log_path}") from None
    return proc, base, doc["metadata"]["name"]


async def one_stream(client: httpx.AsyncClient, i: int, new_tokens: int) -> dict[str, Any]:
    """One streaming completion; token arrival times relative to its send."""
    body = {"prompt": PROMPT.format(i=i), "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices", [])):
                arrivals.append(time.perf_counter() - sent)
    return {"arrivals": arrivals, "completion_tokens": usage.get("completion_tokens", 0)}


async def measure(base: str, concurrency: int, new_tokens: int) -> dict[str, float]:
    """One round at `concurrency`: aggregate tokens/s, median TTFT and inter-token latency."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, i, new_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - began
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["arrivals"][0] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {"tokens_per_s": tokens / wall, "ttft_s": statistics.median(ttfts),
            "inter_token_s": statistics.median(gaps) if gaps else 0.0, "wall_s": wall, "tokens": tokens}


def machine() -> dict[str, Any]:
    """What the numbers ran on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=REPO / "examples/smollm2-local.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, help="override spec.parallelism.microBatches")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        log_path = Path(tmp) / "run.log"
        proc, base, name = start_server(args.file, max(args.concurrency), args.micro_batches, log_path)
        try:
            asyncio.run(measure(base, 2, 8))  # warm-up: first-touch allocations, thread pools
            rows: dict[int, dict[str, float]] = {}
            for conc in args.concurrency:
                rounds = [asyncio.run(measure(base, conc, args.new_tokens)) for _ in range(args.rounds)]
                rows[conc] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
                print(f"concurrency={conc:3d} tokens/s={rows[conc]['tokens_per_s']:8.1f} "
                      f"ttft_s={rows[conc]['ttft_s']:.3f} inter_token_s={rows[conc]['inter_token_s']:.4f} "
                      f"(median of {args.rounds})", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    low, high = min(args.concurrency), max(args.concurrency)
    speedup = rows[high]["tokens_per_s"] / rows[low]["tokens_per_s"]
    print(f"speedup {high} streams vs {low}: {speedup:.2f}x (goal >= 6x)")
    report = {"model": name, "file": str(args.file), "micro_batches": args.micro_batches,
              "new_tokens": args.new_tokens, "rounds": args.rounds,
              "rows": rows, "speedup": speedup, "machine": machine()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
