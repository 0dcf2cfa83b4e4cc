"""Load one rank's shard in a fresh process and report its memory: argv = model_dir tp pp rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from largemodel.runtime.model import CausalLM, load_config
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident set size now (or VmHWM, its peak, or one of its parts, RssAnon / RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def main() -> int:
    model_dir, tp, pp, rank = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ctx = ParallelContext(tp=tp, pp=pp, tp_rank=rank % tp, pp_rank=rank // tp)
    with torch.device("meta"):  # torch's one-time lazy initialisation is not the model's memory
        CausalLM(load_config(model_dir), range(1))
    before = rss_bytes()
    model, _ = build_stage(model_dir, ctx, torch.float32, torch.device("cpu"), 1, 8)
    # VmHWM belongs to this process's address space; ru_maxrss would start from the parent's RSS at fork.
    peak = rss_bytes("VmHWM")
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before": before, "peak": peak, "shard": shard, "anon": rss_bytes("RssAnon"),
                      "file": rss_bytes("RssFile")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
