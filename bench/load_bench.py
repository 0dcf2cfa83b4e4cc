"""Weight load rate of one rank vs a plain sequential read of the same files (issue 17).

    PYTHONSAFEPATH=1 OMP_NUM_THREADS=1 .venv/bin/python bench/load_bench.py [--model DIR] [--pp 2] [--runs 3]

For each pipeline stage of a `--pp` split (tp 1), in this process: `build_stage` (what a rank does:
build the stage on the meta device, allocate, read its slices with safetensors, fuse, caches) and
`load_weights` alone; then a plain sequential read (16 MiB `readinto`) of the checkpoint files
the stage touches. Both run warm (page cache filled by a read first), so the ratio is about the
loader, not the disk. Prints one line per stage and run: MB (10^6 bytes) of the shard, seconds,
MB/s, the sequential MB/s and the ratio. Default model: SmolLM2-135M-Instruct's fp32 build in
~/.cache/largemodel/models (scripts/setup.sh makes it).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from largemodel.runtime.model import load_config
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage, checkpoint_index

DEFAULT_MODEL = Path(os.environ.get("LARGEMODEL_MODELS_DIR", Path.home() / ".cache/largemodel/models")) / \
    "HuggingFaceTB" / "SmolLM2-135M-Instruct"
CHUNK = 16 * 2**20


def sequential_read(files: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) of reading `files` front to back into one reused buffer."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total, began = 0, time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = load_config(args.model)
    files = sorted(set(checkpoint_index(args.model).values()))
    sequential_read(files)  # warm the page cache
    print(f"model={args.model.name} layers={config.num_hidden_layers} files={len(files)} "
          f"bytes={sum(f.stat().st_size for f in files) / 1e6:.0f}MB pp={args.pp}")
    for run in range(args.runs):
        for stage in range(args.pp):
            ctx = ParallelContext(tp=1, pp=args.pp, tp_rank=0, pp_rank=stage)
            began = time.perf_counter()
            model, _ = build_stage(args.model, ctx, torch.float32, torch.device("cpu"), 4, 256)
            seconds = time.perf_counter() - began
            shard = sum(p.numel() * p.element_size() for p in model.parameters())
            del model
            seq_bytes, seq_s = sequential_read(files)
            rate, seq_rate = shard / 1e6 / seconds, seq_bytes / 1e6 / seq_s
            print(f"run={run} stage={stage} shard_mb={shard / 1e6:.0f} build_s={seconds:.2f} load_mb_s={rate:.0f} "
                  f"sequential_mb_s={seq_rate:.0f} ratio={rate / seq_rate:.3f}")


if __name__ == "__main__":
    main()
