"""One rank of a pp world for the bubble test: run prefill steps with 1, then 4 micro-batches.

Run by tests/support/rank_world.py with a JSON spec path as argv[1]. Every rank records each value
its `largemodel_pipeline_bubble_ratio` gauge takes (the engine sets it once per step) and what the
registry exposes at the end of each run, and writes {"1": [...], "exposed1": [x], "4": ...} to
"<out>.rank<R>.json".
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import REGISTRY

from largemodel import metrics
from largemodel.runtime.engine import Engine, SeqInput, worker_loop
from largemodel.runtime.parallel import init_distributed
from largemodel.runtime.weights import build_stage

MICRO_BATCHES = (1, 4)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tp, pp = int(os.environ["TP_SIZE"]), int(os.environ["PP_SIZE"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s %(message)s")
    ctx = init_distributed(rank, world, tp, pp, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    model, _ = build_stage(Path(spec["dir"]), ctx, torch.float32, ctx.device, 4, 64)
    seen: list[float] = []
    real_set = metrics.PIPELINE_BUBBLE.set
    # Observe every value the gauge is set to, not just the last: one value per step.
    metrics.PIPELINE_BUBBLE.set = lambda value: (seen.append(value), real_set(value))[1]  # type: ignore[method-assign]
    values: dict[str, list[float]] = {}
    for count in MICRO_BATCHES:
        seen.clear()
        if rank != 0:
            worker_loop(model, ctx)
        else:
            engine = Engine(model, ctx, micro_batches=count, min_micro_batch_tokens=1)
            prompt = spec["prompt"]
            for _ in range(spec["steps"]):
                engine.step([SeqInput(slot, prompt, 0) for slot in range(4)])
            engine.shutdown()
        values[str(count)] = list(seen)
        values[f"exposed{count}"] = [REGISTRY.get_sample_value("largemodel_pipeline_bubble_ratio") or -1.0]
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(values))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
