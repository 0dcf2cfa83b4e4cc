"""Engine benchmark: decode speed against transformers, memory-bandwidth roofline, PP overlap, batching.

One command measures everything in one run, so every ratio compares numbers taken on the same
machine under the same load:

    PYTHONSAFEPATH=1 .venv/bin/python bench/engine_bench.py [--preset cpu|tiny|gpu] [--out result.json]

1. builds (once, cached under ~/.cache/largemodel/bench/) a seeded random Llama checkpoint big enough
   to be memory-bound (preset cpu: ~250M parameters, ~1 GB fp32; GQA 16/4 heads);
2. measures memory bandwidth (best of several passes of summing a 1 GiB tensor) at the start, after
   the batch-1 comparison and at the end; the roofline uses the highest of the three;
3. batch-1 decode tokens/s: transformers `generate` vs the native Engine (tp=1, pp=1) on that checkpoint,
   checking both produce the same greedy tokens, and the Engine's fraction of the roofline
   (bytes a decode step must read: every weight but the embedding table, plus the KV cache);
   on CPU also the same Engine with its CPU kernels switched off (F.linear and torch's ops), and
   the whole comparison again with both sides in bfloat16;
4. batched decode tokens/s at batch 1, 4 and 16;
5. PP=2 (two rank processes, gloo on 127.0.0.1, one thread each, layers split as the planner splits
   them: 9/7 for preset cpu, its LM head weighing 2.9 layers on the last stage): decode throughput of 16
   sequences with 1 micro-batch vs 4 micro-batches per step(), and with 4 groups kept in flight
   across steps through submit()/result().

On a machine with CUDA (preset gpu) steps 2-4 run on the GPU at tp=1 in bfloat16; step 5 is CPU-only.
Prints a Markdown table and the machine; --out also writes the numbers as JSON.

--model DIR runs the same on a real checkpoint instead of a preset (e.g. the README's SmolLM2, which
`largemodel run` builds under ~/.cache/largemodel/models/HuggingFaceTB/SmolLM2-135M-Instruct);
--threads sets torch's thread count; on CPU the batch-1 Engine is also timed at every instruction-set
level of the decode kernels this CPU runs (avx512/avx2/neon/generic), in the same run; --no-bf16 and
--no-pp leave out steps 3's bfloat16 repeat and 5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Huge pages for torch's large CPU allocations, set before torch allocates anything, for transformers
# and the Engine alike (the rank launcher sets the same for every rank process).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from largemodel.runtime import cpu_kernels  # noqa: E402
from largemodel.runtime.engine import Engine, SeqInput  # noqa: E402
from largemodel.runtime.parallel import ParallelContext, init_distributed  # noqa: E402
from largemodel.runtime.weights import build_stage  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2),
    "cpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=4),
    "gpu": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4),
}
PROMPT_LEN = 16
MAX_LEN = 256


def build_checkpoint(preset: str, root: Path) -> Path:
    """A seeded random Llama of `preset` saved by transformers (reused when already there)."""
    directory = root / f"llama-{preset}"
    if (directory / "config.json").exists():
        return directory
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=False,
                         initializer_range=0.05, eos_token_id=None, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_gbs(device: torch.device) -> float:
    """Best read bandwidth (GB/s) over several sums of a 1 GiB float32 tensor."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        began = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - began)
    return x.numel() * 4 / best / 1e9


def prompt_tokens(vocab: int, batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]


def load_hf(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The transformers model the Engine is compared with."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def hf_decode(model: Any, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """transformers greedy `generate` at batch 1: decode tokens/s (prefill subtracted) and the tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        sync(device)
        began = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        sync(device)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
        total = time.perf_counter() - began
    return (new_tokens - 1) / (total - prefill), out[0, len(prompt):].tolist()


def batch1_duel(model_dir: Path, prompt: list[int], new_tokens: int, device: torch.device, dtype: torch.dtype,
                rounds: int) -> dict[str, Any]:
    """transformers vs Engine at batch 1, alternating `rounds` times (a shared machine drifts): medians."""
    hf = load_hf(model_dir, device, dtype)
    model, _ = build_stage(model_dir, ParallelContext(device=device), dtype, device, 16, MAX_LEN)
    engine = Engine(model, ParallelContext(device=device))
    hf_decode(hf, prompt, 4)  # warm-ups
    engine_decode(engine, [prompt], 4)
    hf_runs, ours_runs = [], []
    for _ in range(rounds):
        hf_tps, hf_tokens = hf_decode(hf, prompt, new_tokens)
        ours_tps, ours_tokens = engine_decode(engine, [prompt], new_tokens)
        hf_runs.append(hf_tps)
        ours_runs.append(ours_tps)
    del hf
    hf_med, ours_med = sorted(hf_runs)[rounds // 2], sorted(ours_runs)[rounds // 2]
    # Other load only ever slows a run down, so the best of the rounds is the steadier comparison.
    return {"engine": engine, "hf_tok_s": hf_med, "engine_tok_s": ours_med, "speedup": ours_med / hf_med,
            "speedup_best": max(ours_runs) / max(hf_runs), "hf_runs": hf_runs, "engine_runs": ours_runs,
            "same_tokens": ours_tokens[0] == hf_tokens}


def engine_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy decode of len(prompts) sequences with step(): decode tokens/s (all sequences) and tokens."""
    batch = [SeqInput(i, p, 0) for i, p in enumerate(prompts)]
    out = [[t] for t in engine.step(batch)]
    sync(engine.ctx.device)
    began = time.perf_counter()
    for k in range(new_tokens - 1):
        toks = engine.step([SeqInput(i, [out[i][-1]], PROMPT_LEN + k) for i in range(len(prompts))])
        for i, t in enumerate(toks):
            out[i].append(t)
    sync(engine.ctx.device)
    return len(prompts) * (new_tokens - 1) / (time.perf_counter() - began), out


def int8_rows(model_dir: Path, prompts: list[list[int]], new_tokens: int, device: torch.device, dtype: torch.dtype,
              rounds: int) -> dict[str, Any]:
    """Issue 19: our engine with MODEL_QUANTIZATION=int8 against the same engine unquantized, in this run:
    batch-1 and batch-16 decode tokens/s (medians of alternating rounds) and the int8/float ratios."""
    engines = {q: Engine(build_stage(model_dir, ParallelContext(device=device), dtype, device, 16, MAX_LEN,
                                     quantization=q)[0], ParallelContext(device=device)) for q in ("none", "int8")}
    runs: dict[str, dict[int, list[float]]] = {q: {1: [], 16: []} for q in engines}
    tokens: dict[str, list[int]] = {}
    for engine in engines.values():
        engine_decode(engine, [prompts[0]], 4)  # warm-up
    for _ in range(rounds):
        for q, engine in engines.items():
            for b in (1, 16):
                tps, out = engine_decode(engine, prompts[:b], new_tokens)
                runs[q][b].append(tps)
                tokens[q] = out[0]
    for engine in engines.values():
        engine.shutdown()
    med = {q: {b: sorted(v)[len(v) // 2] for b, v in r.items()} for q, r in runs.items()}
    return {"tok_s": med, "runs": runs, "int8_vs_float_batch1": med["int8"][1] / med["none"][1],
            "int8_vs_float_batch16": med["int8"][16] / med["none"][16],
            "same_first_tokens": sum(a == b for a, b in zip(tokens["int8"], tokens["none"], strict=True))}


def decode_bytes_per_step(engine: Engine, context: int) -> int:
    """Bytes one batch-1 decode step must read: weights (one embedding row only, unless the LM head is the
    embedding table, tied) plus its KV cache."""
    model = engine.model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if tied or "embed_tokens" not in n)
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_size * context * next(model.parameters()).element_size()
    return int(weights + kv)


def pipelined_decode(engine: Engine, prompts: list[list[int]], new_tokens: int, groups: int) -> float:
    """Decode with `groups` independent groups kept in flight across steps (submit/result); tokens/s."""
    size = len(prompts) // groups
    members = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
    last: dict[int, int] = {}
    tickets = {g: engine.submit([SeqInput(i, prompts[i], 0) for i in members[g]]) for g in range(groups)}
    for g in range(groups):
        last.update(zip(members[g], engine.result(tickets[g]), strict=True))
        tickets[g] = engine.submit([SeqInput(i, [last[i]], PROMPT_LEN) for i in members[g]])
    began = time.perf_counter()
    for k in range(1, new_tokens - 1):
        for g in range(groups):
            last.update(zip(members[g], engine.result(tickets[g]), strict=True))
            tickets[g] = engine.submit([SeqInput(i, [last[i]], PROMPT_LEN + k) for i in members[g]])
    for g in range(groups):
        engine.result(tickets[g])
    return len(prompts) * (new_tokens - 1) / (time.perf_counter() - began)


def prefill_tokens_per_s(engine: Engine, seqs: int, length: int, vocab: int) -> float:
    """Prompt tokens/s of one step() that prefills `seqs` prompts of `length` tokens."""
    gen = torch.Generator().manual_seed(9)
    batch = [SeqInput(i, torch.randint(3, vocab, (length,), generator=gen).tolist(), 0) for i in range(seqs)]
    engine.step(batch)  # warm-up
    began = time.perf_counter()
    engine.step(batch)
    return seqs * length / (time.perf_counter() - began)


def pp_rank_main(args: argparse.Namespace) -> int:
    """One rank of the PP=2 measurement; rank 0 writes {mode: tokens/s} to args.out."""
    torch.set_num_threads(1)
    ctx = init_distributed(args.pp_rank, 2, 1, 2, "127.0.0.1", args.port)
    model, _ = build_stage(Path(args.model_dir), ctx, torch.float32, ctx.device, 16, MAX_LEN)
    if ctx.rank != 0:
        from largemodel.runtime.engine import worker_loop

        worker_loop(model, ctx)
        return 0
    prompts = prompt_tokens(model.config.vocab_size, 16)
    # min_micro_batch_tokens=1: split exactly as asked, to measure what splitting does.
    engine = Engine(model, ctx, micro_batches=1, min_micro_batch_tokens=1)
    engine_decode(engine, prompts[:4], 3)  # warm-up
    results = {
        # Decode: micro-batches of 4 sequences each, 1 in flight (stage 1 idles while stage 0
        # works and vice versa) against 4 kept in flight across steps (both stages busy).
        "decode_1_in_flight": pipelined_decode(engine, prompts[:4], args.tokens, 1),
        "decode_4_in_flight": pipelined_decode(engine, prompts, args.tokens, 4),
    }
    # The same 16 sequences per step(), split into 1 or 4 micro-batches inside the step.
    for name, micro in (("step16_m1", 1), ("step16_m4", 4)):
        engine.micro_batches = micro
        results[f"decode_{name}"] = engine_decode(engine, prompts, args.tokens)[0]
        results[f"prefill_{name}"] = prefill_tokens_per_s(engine, 16, 64, model.config.vocab_size)
    engine.shutdown()
    Path(args.out).write_text(json.dumps(results))
    return 0


def pp_throughput(model_dir: Path, tokens: int, workdir: Path) -> dict[str, float]:
    """Run the two PP ranks as processes (one core each) and collect rank 0's numbers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / "pp.json"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--pp-rank", str(r), "--port", str(port), "--model-dir",
                               str(model_dir), "--tokens", str(tokens), "--out", str(out)], env=env)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0, 0]:
        raise RuntimeError(f"PP ranks exited {codes}")
    return json.loads(out.read_text())


def machine() -> str:
    """CPU model, core count and memory; the GPU name when there is one."""
    cpu = platform.processor() or "cpu"
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{names[0] if names else cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/largemodel/bench")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating batch-1 runs per side (median)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", type=Path, help="a checkpoint directory to use instead of the preset's")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 repeat of the batch-1 duel")
    parser.add_argument("--no-pp", action="store_true", help="skip the PP=2 measurement")
    parser.add_argument("--int8", action="store_true",
                        help="add the int8 row (MODEL_QUANTIZATION=int8 vs the same engine unquantized)")
    parser.add_argument("--pp-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pp_rank is not None:
        return pp_rank_main(args)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or build_checkpoint(args.preset, args.cache)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    res: dict[str, Any] = {"machine": machine(), "preset": str(args.model or args.preset), "device": str(device),
                           "dtype": str(dtype), "threads": torch.get_num_threads(),
                           "load_avg_start": os.getloadavg()[0]}
    res["bandwidth_gbs"] = bandwidth_gbs(device)
    prompts = prompt_tokens(vocab, 16)

    duel = batch1_duel(model_dir, prompts[0], args.tokens, device, dtype, args.rounds)
    engine = duel.pop("engine")
    ours_tps = duel["engine_tok_s"]
    res["params_m"] = sum(p.numel() for p in engine.model.parameters()) / 1e6
    res.update(duel)
    step_bytes = decode_bytes_per_step(engine, PROMPT_LEN + args.tokens // 2)
    res["bandwidth_gbs_after_duel"] = bandwidth_gbs(device)
    res["engine_stream_gbs"] = ours_tps * step_bytes / 1e9
    res["batched_tok_s"] = {b: engine_decode(engine, prompts[:b], args.tokens)[0] for b in (1, 4, 16)}
    if not cuda:
        # The same Engine with every matmul on F.linear (MKL/oneDNN): what the decode kernel adds.
        res["cpu_kernel"] = cpu_kernels.load()
        res["cpu_kernel_level"] = cpu_kernels.level()
        with cpu_kernels.disabled():
            res["engine_f_linear_tok_s"] = sorted(engine_decode(engine, [prompts[0]], args.tokens)[0]
                                                  for _ in range(args.rounds))[args.rounds // 2]
        # Every instruction-set level of the kernels this CPU runs, at batch 1 and 16 (medians of the rounds).
        if res["cpu_kernel"]:
            res["engine_tok_s_by_level"] = {}
            for name in cpu_kernels.host_levels():
                with cpu_kernels.using(name):
                    engine_decode(engine, [prompts[0]], 4)
                    res["engine_tok_s_by_level"][name] = {
                        b: sorted(engine_decode(engine, prompts[:b], args.tokens)[0]
                                  for _ in range(args.rounds))[args.rounds // 2] for b in (1, 16)}
    engine.shutdown()
    del engine
    if args.int8:
        res["int8"] = int8_rows(model_dir, prompts, args.tokens, device, dtype, args.rounds)
    if not cuda and not args.no_bf16:
        # The same checkpoint in bfloat16 for both sides: half the bytes per decode step.
        bf16 = batch1_duel(model_dir, prompts[0], args.tokens, device, torch.bfloat16, args.rounds)
        bf16.pop("engine").shutdown()
        res["bfloat16"] = bf16
        res["engine_bf16_vs_hf_fp32"] = bf16["engine_tok_s"] / res["hf_tok_s"]
    if not cuda and not args.no_pp:
        pp = pp_throughput(model_dir, args.tokens, args.cache)
        res["pp2_tok_s"] = pp
        res["pp2_decode_speedup_4_vs_1_in_flight"] = pp["decode_4_in_flight"] / pp["decode_1_in_flight"]
        res["pp2_decode_speedup_step16_m4_vs_m1"] = pp["decode_step16_m4"] / pp["decode_step16_m1"]
        res["pp2_prefill_speedup_step16_m4_vs_m1"] = pp["prefill_step16_m4"] / pp["prefill_step16_m1"]
    # Other work on a shared machine moves every number: record how busy it was, and re-measure.
    res["bandwidth_gbs_end"] = bandwidth_gbs(device)
    # A shared machine's bus moves with its neighbours (2x within a minute here): the roofline takes
    # the highest bandwidth measured in the run, so the fraction is a lower bound.
    peak = max(res["bandwidth_gbs"], res["bandwidth_gbs_after_duel"], res["bandwidth_gbs_end"])
    res["roofline_tok_s"] = peak * 1e9 / step_bytes
    res["roofline_fraction"] = ours_tps / res["roofline_tok_s"]
    res["roofline_fraction_best"] = max(duel["engine_runs"]) / res["roofline_tok_s"]
    res["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
