"""Weight load rate of one rank vs a plain sequential read of the same files (issue 17).

    PYTHONSAFEPATH=1 OMP_NUM_THREADS=1 .venv/bin/python bench/load_bench.py [--model DIR] [--pp 2] [--runs 5]

For each pipeline stage of a `--pp` split (tp 1), in this process, with the allocator a rank runs
with (launch.py sets THP_MEM_ALLOC_ENABLE=1 for every rank; so does this bench, before torch loads):
`build_stage` (what a rank does: build the stage on the meta device, allocate, read its slices,
fuse, KV caches) and `load_weights` alone. Two baselines read the checkpoint files the stage
touches in the same run:
- `fresh`: one thread reads the files front to back into newly allocated memory (what any loader
  that keeps the bytes must do: the pages fault in), the fair "plain sequential read";
- `cat`: one thread reads them through one reused 16 MiB buffer (no page faults at all: the
  page-cache copy rate, an upper bound no loader that keeps the weights reaches).
All runs are warm (page cache filled first), so the ratios are about the loader, not the disk.
Each stage repeats the four measures `--runs` times, interleaved, and prints the best rate of each
(MB = 10^6 bytes of the shard per second; the machine's slow moments, THP compaction among them,
vary by 10x between repeats) and the ratios load/fresh, build/fresh and load/cat. Default model:
SmolLM2-135M-Instruct's fp32 build in ~/.cache/largemodel/models (scripts/setup.sh makes it).
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as runtime/launch.py gives every rank; read once, at torch's first allocation

import argparse  # noqa: E402
import ctypes  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from largemodel.runtime.model import load_config  # noqa: E402
from largemodel.runtime.parallel import ParallelContext  # noqa: E402
from largemodel.runtime.weights import build_stage, checkpoint_index, empty_stage, load_threads, load_weights  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("LARGEMODEL_MODELS_DIR", Path.home() / ".cache/largemodel/models")) / \
    "HuggingFaceTB" / "SmolLM2-135M-Instruct"
CHUNK = 16 * 2**20


def read_reused(files: list[Path]) -> float:
    """MB/s of reading `files` front to back through one reused buffer (like `cat > /dev/null`)."""
    view = memoryview(bytearray(CHUNK))
    total, began = 0, time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / 1e6 / (time.perf_counter() - began)


def read_fresh(files: list[Path]) -> float:
    """MB/s of reading `files` front to back, one thread, into newly allocated (torch) memory."""
    total, began = 0, time.perf_counter()
    for file in files:
        size = file.stat().st_size
        target = torch.empty(size, dtype=torch.uint8)
        view = memoryview((ctypes.c_char * size).from_address(target.data_ptr())).cast("B")
        with file.open("rb", buffering=0) as f:
            done = 0
            while done < size and (n := f.readinto(view[done:done + CHUNK])):
                done += n
        total += done
        del view, target
    return total / 1e6 / (time.perf_counter() - began)


def load_only(model_dir: Path, ctx: ParallelContext) -> tuple[int, float]:
    """(bytes, seconds) of `load_weights` into a freshly allocated, transformed stage."""
    model, config, shards = empty_stage(model_dir, ctx, torch.float32, torch.device("cpu"))
    began = time.perf_counter()
    nbytes = load_weights(model, config, model_dir, shards)
    return nbytes, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = load_config(args.model)
    files = sorted(set(checkpoint_index(args.model).values()))
    read_reused(files)  # warm the page cache
    build_stage(args.model, ParallelContext(tp=1, pp=args.pp), torch.float32, torch.device("cpu"), 4, 256)  # kernels, imports
    print(f"model={args.model.name} layers={config.num_hidden_layers} files={len(files)} "
          f"bytes={sum(f.stat().st_size for f in files) / 1e6:.0f}MB pp={args.pp} readers={load_threads()} "
          f"thp_alloc={os.environ.get('THP_MEM_ALLOC_ENABLE')} cpu={os.cpu_count()}")
    for stage in range(args.pp):
        ctx = ParallelContext(tp=1, pp=args.pp, tp_rank=0, pp_rank=stage)
        best = {"load": 0.0, "build": 0.0, "fresh": 0.0, "cat": 0.0}
        for _ in range(args.runs):  # interleaved, so a slow moment of the machine hits every measure alike
            nbytes, load_s = load_only(args.model, ctx)
            began = time.perf_counter()
            model, _ = build_stage(args.model, ctx, torch.float32, torch.device("cpu"), 4, 256)
            build_s = time.perf_counter() - began
            del model
            for key, rate in (("load", nbytes / 1e6 / load_s), ("build", nbytes / 1e6 / build_s),
                              ("fresh", read_fresh(files)), ("cat", read_reused(files))):
                best[key] = max(best[key], rate)
        print(f"stage={stage} shard_mb={nbytes / 1e6:.0f} best of {args.runs}: load_mb_s={best['load']:.0f} "
              f"build_mb_s={best['build']:.0f} fresh_mb_s={best['fresh']:.0f} cat_mb_s={best['cat']:.0f} "
              f"load_vs_fresh={best['load'] / best['fresh']:.2f} build_vs_fresh={best['build'] / best['fresh']:.2f} "
              f"load_vs_cat={best['load'] / best['cat']:.2f}")

if __name__ == "__main__":
    main()
