"""One rank of a test world: load each listed model in turn, drive it from rank 0, record the results.

Run as a script by tests/support/rank_world.py with RANK, WORLD_SIZE, TP_SIZE, PP_SIZE, MASTER_ADDR,
MASTER_PORT in the environment and a JSON spec path as argv[1]. Rank 0 writes {model: {tokens,
logits}} to the spec's "out" path; the test process compares it with transformers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from largemodel.runtime.deepspeed_engine import load_autotp
from largemodel.runtime.engine import Engine, SamplingParams, SeqInput, worker_loop
from largemodel.runtime.parallel import init_distributed
from largemodel.runtime.weights import build_stage


def drive(engine: Engine, prompts: list[list[int]], new_tokens: int, sampling: SamplingParams) -> dict:
    """Continuous batching as the scheduler does it: prompt 2 joins while 0 and 1 already decode."""
    first, logits = engine.step_with_logits([SeqInput(0, prompts[0], 0, sampling), SeqInput(1, prompts[1], 0, sampling)])
    out = {0: [first[0]], 1: [first[1]]}
    all_logits = {0: logits[0].tolist(), 1: logits[1].tolist()}
    batch = [SeqInput(i, [out[i][-1]], len(prompts[i]), sampling) for i in (0, 1)]
    toks, logits = engine.step_with_logits(batch + [SeqInput(2, prompts[2], 0, sampling)])
    out[0].append(toks[0])
    out[1].append(toks[1])
    out[2] = [toks[2]]
    all_logits[2] = logits[2].tolist()
    while any(len(v) < new_tokens for v in out.values()):
        live = [i for i in out if len(out[i]) < new_tokens]
        toks = engine.step([SeqInput(i, [out[i][-1]], len(prompts[i]) + len(out[i]) - 1, sampling) for i in live])
        for i, t in zip(live, toks, strict=True):
            out[i].append(t)
    return {"tokens": [out[i] for i in range(3)], "logits": [all_logits[i] for i in range(3)]}


def prefix_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Three prompts sharing their first 37 tokens (two full 16-token blocks, then mid-block), different after."""
    pool = [t for p in prompts for t in p] * 4
    shared = pool[:37]
    return [shared + pool[40:43], shared + pool[50:53], shared + pool[60:65]]


def drive_prefix(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy, the scheduler's way with the prefix cache: prompt 0 runs first; prompts 1 and 2 then start
    together after the prefix it left cached while it decodes. Returns tokens, first logits, cached counts."""
    greedy = SamplingParams()
    out: dict[int, list[int]] = {}
    cached = [engine.start_sequence(0, prompts[0])]
    first, logits = engine.step_with_logits([SeqInput(0, prompts[0][cached[0]:], cached[0], greedy, True)])
    out[0], all_logits = [first[0]], {0: logits[0].tolist()}
    cached += [engine.start_sequence(i, prompts[i]) for i in (1, 2)]
    batch = [SeqInput(0, [out[0][-1]], len(prompts[0]), greedy)]
    batch += [SeqInput(i, prompts[i][cached[i]:], cached[i], greedy, True) for i in (1, 2)]
    toks, logits = engine.step_with_logits(batch)
    out[0].append(toks[0])
    for row, i in ((1, 1), (2, 2)):
        out[i], all_logits[i] = [toks[row]], logits[row].tolist()
    while any(len(v) < new_tokens for v in out.values()):
        live = [i for i in out if len(out[i]) < new_tokens]
        toks = engine.step([SeqInput(i, [out[i][-1]], len(prompts[i]) + len(out[i]) - 1, greedy) for i in live])
        for i, t in zip(live, toks, strict=True):
            out[i].append(t)
    for i in out:
        engine.end_sequence(i)
    return {"tokens": [out[i] for i in range(3)], "logits": [all_logits[i] for i in range(3)], "cached": cached}


def collective_counts() -> dict[str, float]:
    """This process's all-reduce calls/bytes/timed samples (TP group) and stage-0 forwards so far."""
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    tp = {"op": "all_reduce", "group": "tp", "backend": "gloo"}
    return {
        "calls": value("largemodel_collective_calls_total", **tp),
        "bytes": value("largemodel_collective_bytes_total", **tp),
        "timed": value("largemodel_collective_seconds_count", **tp),
        "forwards": sum(value("largemodel_stage_step_seconds_count", stage="0", phase=phase)
                        for phase in ("prefill", "decode")),
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tp, pp = int(os.environ["TP_SIZE"]), int(os.environ["PP_SIZE"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s %(message)s")
    ctx = init_distributed(rank, world, tp, pp, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    results = {}
    for entry in spec["models"]:
        if spec.get("engine", "native") == "deepspeed":
            model = load_autotp(Path(entry["dir"]), ctx, torch.float32, 4, 64)
        else:
            model, _ = build_stage(Path(entry["dir"]), ctx, torch.float32, ctx.device, 4, 64,
                                   quantization=entry.get("quantization", "none"))
        if rank != 0:
            worker_loop(model, ctx)
            continue
        # min_micro_batch_tokens=1: split even these tiny batches, so every step really pipelines.
        engine = Engine(model, ctx, micro_batches=spec.get("micro_batches", 2), min_micro_batch_tokens=1)
        before = collective_counts()
        results[entry["name"]] = {
            name: drive(engine, spec["prompts"], run["new_tokens"], SamplingParams(**run["params"]))
            for name, run in spec["samplings"].items()
        }
        if spec.get("prefix") and engine.blocks is not None:
            # The same requests with the prefix cache on and off: the outputs must not change.
            shared = prefix_prompts(spec["prompts"])
            on = drive_prefix(engine, shared, 8)
            engine.blocks.prefix_cache = False
            off = drive_prefix(engine, shared, 8)
            engine.blocks.prefix_cache = True
            results[entry["name"]]["prefix"] = {"on": on, "off": off}
        if spec.get("idle_s"):
            # Longer than the process-group timeout: only the engine's heartbeat keeps the group alive.
            time.sleep(spec["idle_s"])
            greedy = spec["samplings"]["greedy"]
            results[entry["name"]]["after_idle"] = drive(engine, spec["prompts"], greedy["new_tokens"],
                                                         SamplingParams(**greedy["params"]))
        engine.shutdown()
        after = collective_counts()
        results[entry["name"]]["collectives"] = {k: after[k] - before[k] for k in after}
        results[entry["name"]]["stage0_layers"] = len(model.model.layers) if hasattr(model, "model") else 0
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
