"""Prefix caching through the real HTTP API: a ~1,000-token shared system prompt, then short user turns.

Starts `largemodel run` on a copy of a LargeModel file (default examples/smollm2-local.yaml) twice in
the same run, with `spec.serving.prefixCache` on and off. Each time: one warm-up request carries the
system prompt (what an earlier conversation turn leaves cached), then --requests streaming
completions of system prompt + a different short user turn are sent at once (greedy, EOS ignored,
--new-tokens each). Reports per setting:

- TTFT (send -> first streamed token), median over the requests
- aggregate tokens/s = generated tokens / wall time from first send to last [DONE]
- prefix-cache hit rate = cached prompt tokens / prompt tokens looked up, from /metrics
  (largemodel_prefix_cache_{hits,queries}_total, tokens)

and the same-run ratios: TTFT with the cache / without (issue 18's goal: at most 1/5) and tokens/s
with / without (goal: not lower). Greedy outputs of the two settings are compared too.

Usage: PYTHONSAFEPATH=1 .venv/bin/python bench/prefix_bench.py [--file F] [--requests 16]
       [--new-tokens 32] [--system-words 700] [--json out.json]
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
RULES = ("Answer in plain words.", "Be brief and exact.", "Never invent a fact.", "Cite the rule you follow.",
         "Say when you do not know.", "Keep a friendly tone.", "Use metric units.", "Prefer short sentences.")


def system_prompt(words: int) -> str:
    """A long, fixed system prompt (numbered house rules), about `words` words."""
    lines, count, i = ["You are the support assistant of a lighthouse museum. House rules follow."], 0, 0
    while count < words:
        line = f"Rule {i + 1}: {RULES[i % len(RULES)]} This applies to visitors, staff and volunteers alike."
        lines.append(line)
        count += len(line.split())
        i += 1
    return "\n".join(lines) + "\n"


def start_server(lm_file: Path, prefix_cache: bool, max_batch: int,
                 log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    doc = yaml.safe_load(lm_file.read_text())
    serving = doc["spec"].setdefault("serving", {})
    serving["prefixCache"] = prefix_cache
    serving["maxBatchSize"] = max(max_batch, int(serving.get("maxBatchSize", 1)))
    serving["maxQueue"] = max(max_batch + 4, int(serving.get("maxQueue", 0)))
    copy = log_path.with_suffix(".yaml")
    copy.write_text(yaml.safe_dump(doc))
    port = free_port()
    cmd = [sys.executable, "-m", "largemodel.operator.cli", "run", "-f", str(copy), "--port", str(port),
           "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONSAFEPATH": "1"}, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", [proc], 600, poll_s=0.5)
    except NotReadyError as err:
        if proc.poll() is None:
            proc.kill()
        raise SystemExit(f"largemodel run: {err}; log: {log_path}") from None
    return proc, base


async def one_stream(client: httpx.AsyncClient, prompt: str, new_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    text, usage = "", {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if choice.get("text"):
                    arrivals.append(time.perf_counter() - sent)
                    text += choice["text"]
    return {"arrivals": arrivals, "text": text, "usage": usage}


def scrape(base: str) -> dict[str, float]:
    """The prefix-cache counters (tokens) from the server's /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        for name in ("largemodel_prefix_cache_hits_total", "largemodel_prefix_cache_queries_total"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


async def measure(base: str, system: str, requests: int, new_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=requests + 4)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        warm = await one_stream(client, system + "User: hello\nAssistant:", 4)
        before = scrape(base)
        began = time.perf_counter()
        prompts = [system + f"User {i}: what does rule {i + 1} mean for a school group?\nAssistant:"
                   for i in range(requests)]
        results = await asyncio.gather(*(one_stream(client, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - began
        after = scrape(base)
    hits = after.get("largemodel_prefix_cache_hits_total", 0) - before.get("largemodel_prefix_cache_hits_total", 0)
    queries = (after.get("largemodel_prefix_cache_queries_total", 0)
               - before.get("largemodel_prefix_cache_queries_total", 0))
    return {
        "prompt_tokens": warm["usage"].get("prompt_tokens", 0),
        "ttft_s": statistics.median(r["arrivals"][0] for r in results),
        "tokens_per_s": sum(r["usage"].get("completion_tokens", 0) for r in results) / wall,
        "wall_s": wall, "hit_rate": hits / queries if queries else 0.0,
        "texts": [r["text"] for r in results],
    }


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((set(ln.split(":", 1)[1].split()) for ln in info if ln.split(":", 1)[0].strip()
                  in ("flags", "Features")), set())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=REPO / "examples/smollm2-local.yaml")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=700, help="about 1,000 tokens for SmolLM2's tokenizer")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    system = system_prompt(args.system_words)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-bench-") as tmp:
        for setting, on in (("cache on", True), ("cache off", False)):
            proc, base = start_server(args.file, on, args.requests, Path(tmp) / f"run-{on}.log")
            try:
                rows[setting] = asyncio.run(measure(base, system, args.requests, args.new_tokens))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            r = rows[setting]
            print(f"{setting:9s} prompt_tokens={r['prompt_tokens']} ttft_s={r['ttft_s']:.3f} "
                  f"tokens/s={r['tokens_per_s']:.1f} hit_rate={r['hit_rate']:.3f}", flush=True)
    on, off = rows["cache on"], rows["cache off"]
    ttft_ratio, rate_ratio = on["ttft_s"] / off["ttft_s"], on["tokens_per_s"] / off["tokens_per_s"]
    same = on["texts"] == off["texts"]
    print(f"TTFT on/off = {ttft_ratio:.3f} (goal <= 0.2); tokens/s on/off = {rate_ratio:.2f}x (goal >= 1); "
          f"hit rate {on['hit_rate']:.3f}; same greedy text: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ttft_ratio": ttft_ratio, "tokens_per_s_ratio": rate_ratio,
                                         "same_text": same, "machine": machine(), "requests": args.requests,
                                         "new_tokens": args.new_tokens}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
