"""Build one rank's shard of the model and fill it from safetensors, reading only that shard.

The stage model is built on the meta device, cut by `apply_tensor_parallel`, transformed
(`transforms`: fused projections, CPU kernel modules), then allocated at shard size. Whole
tensors and row shards are contiguous byte ranges of a safetensors file: they are read with
`os.preadv` straight into the parameter's memory, in 8 MiB ranges spread over a few reader
threads (one copy, from the page cache or the disk, no mapping; bench/load_bench.py measures it
against a plain read of the same files); a fused parameter is read block by block into its row
blocks. Column shards, dtype conversions and vocab padding go through
`safe_open(...).get_slice`, per tensor, so the pages mapped for one tensor are released before
the next. Either way only this rank's part is read, and peak memory stays near the shard, never
the whole model.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from largemodel import metrics, modelfacts
from largemodel.partition import stage_layer_range
from largemodel.runtime import cpu_kernels
from largemodel.runtime.gguf_load import GGUFTensors, ggml_kinds, load_gguf_weights
from largemodel.runtime.model import CausalLM, ModelConfig, ModelConfigError, load_config
from largemodel.runtime.parallel import ParallelContext, Shard, apply_tensor_parallel
from largemodel.runtime.quant import GGMLLinear, apply_ggml_kinds, apply_quantization, quantize_rows
from largemodel.runtime.transforms import apply_cpu_kernels, checkpoint_tensors, fuse_projections

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PROGRESS_EVERY_S = 5.0
READ_CHUNK = 8 * 2**20  # bytes per direct read: small enough to spread one tensor over the readers
MAX_READERS = 8


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for a MODEL_DTYPE value; ValueError listing the accepted names otherwise."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}") from None


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"no *.safetensors files in {model_dir}")
    return {name: file for file in files for name in safetensors_entries(file)}


# safetensors dtype names -> torch dtypes the direct reader may copy bytes for.
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}
SCALE_SUFFIX = "_scale"  # `<name>.weight_scale`: an int8 weight's fp32 row scales (quant.Int8Linear)
GGUF_FILE = "model.gguf"  # in a GGUF model directory (modelstore.GGUF_FILE)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


def safetensors_entries(file: Path) -> dict[str, TensorEntry]:
    """The header of a safetensors file: 8-byte little-endian length, then JSON with data_offsets."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:
            raise ModelConfigError(f"{file}: safetensors header of {length} bytes is not plausible")
        header = json.loads(f.read(length))
    base = 8 + length
    if not isinstance(header, dict):
        raise ModelConfigError(f"{file}: safetensors header is not a JSON object")
    entries = {name: TensorEntry(str(meta["dtype"]), tuple(int(d) for d in meta["shape"]),
                                 base + int(meta["data_offsets"][0]), base + int(meta["data_offsets"][1]))
               for name, meta in header.items() if name != "__metadata__"}
    end, size = max((e.end for e in entries.values()), default=base), file.stat().st_size
    if size < end:
        raise ModelConfigError(f"{file} is {size} bytes but its header lists tensors up to byte {end}: "
                               "an incomplete copy or download")
    return entries


def direct_range(entry: TensorEntry, shard: Shard | None, param: Tensor) -> tuple[int, int] | None:
    """(file offset, bytes) when `param`'s slice is one contiguous byte range of the file that can be
    read straight into it: a whole tensor or a row shard, CPU, contiguous, same dtype, no padding.
    None when the case is not that simple and the caller should use `read_shard`."""
    dtype = _FILE_DTYPES.get(entry.dtype)
    if dtype is None or dtype != param.dtype or param.device.type != "cpu" or not param.is_contiguous():
        return None
    row_bytes = param.element_size()
    for dim in entry.shape[1:]:
        row_bytes *= dim
    if shard is None:
        begin, count = entry.begin, entry.end - entry.begin
        if tuple(param.shape) != entry.shape:
            return None
    elif shard.dim == 0 and not shard.zero and entry.shape and shard.stop <= entry.shape[0]:
        begin, count = entry.begin + shard.start * row_bytes, (shard.stop - shard.start) * row_bytes
        if tuple(param.shape) != (shard.stop - shard.start, *entry.shape[1:]):
            return None
    else:
        return None
    if count != param.numel() * param.element_size():
        return None
    return begin, count


def read_range(fd: int, offset: int, address: int, count: int) -> int:
    """`count` bytes of the file at `offset` into memory at `address` (one kernel copy, no mapping)."""
    view = memoryview((ctypes.c_char * count).from_address(address)).cast("B")
    done = 0
    while done < count:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ModelConfigError(f"safetensors file ends inside a tensor (read {done} of {count} bytes)")
        done += n
    return count


def read_shard(file: Path, name: str, shard: Shard | None) -> Tensor:
    """Read tensor `name`'s slice `shard` (the whole tensor when None) from `file`."""
    with safe_open(str(file), framework="pt") as f:
        view = f.get_slice(name)
        if shard is None:
            return view[:]
        size = view.get_shape()[shard.dim]
        stop = min(shard.stop, size)
        part = view[shard.start:stop] if shard.dim == 0 else view[:, shard.start:stop]
    if stop - shard.start < shard.stop - shard.start:  # vocab padding: zero rows past the real vocab
        pad = list(part.shape)
        pad[shard.dim] = shard.stop - max(stop, shard.start)
        part = torch.cat([part, part.new_zeros(pad)], dim=shard.dim)
    return part


def gguf_file(model_dir: Path) -> Path | None:
    """The GGUF a GGUF model directory serves (modelstore.gguf_model_dir's `model.gguf`), else None."""
    path = Path(model_dir) / GGUF_FILE
    return path if path.exists() else None


def empty_stage(model_dir: Path, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                quantization: str = "none",
                gguf: GGUFTensors | None = None) -> tuple[CausalLM, ModelConfig, dict[str, Shard]]:
    """This rank's stage, cut and transformed on the meta device, then allocated (not yet loaded):
    (model, config, the TP shard of each parameter). `quantization` (MODEL_QUANTIZATION) "int8"
    makes the attention/MLP projections quant.Int8Linear after the dtype cast (their scales stay fp32),
    "q4" makes them Q4_1 quant.GGMLLinear, and "gguf" gives each module the type `gguf` (the opened
    file of a GGUF model directory) stores its tensor in (runtime/gguf_load.py)."""
    config = load_config(model_dir)
    problem = modelfacts.pipeline_problem(layers=config.num_hidden_layers, pp=ctx.pp)
    if quantization in ("q4", "gguf") and not problem:
        block = gguf.header.linear_block if gguf is not None else None
        problem = modelfacts.tensor_problem(heads=config.num_attention_heads, kv_heads=config.kv_heads,
                                            intermediate=config.intermediate_size, tp=ctx.tp, quantization=quantization,
                                            head_dim=config.head_size, hidden=config.hidden_size, block=block)
    if problem:
        raise ModelConfigError(problem)
    if quantization == "gguf" and gguf is None:
        raise ModelConfigError(f"quantization=gguf serves a GGUF file: {model_dir} is not a GGUF model directory "
                               "(the model URI must name a .gguf file)")
    layers = stage_layer_range(config.num_hidden_layers, ctx.pp, ctx.pp_rank, config.head_layers)
    with torch.device("meta"):
        model = CausalLM(config, layers, first=ctx.pp_rank == 0, last=ctx.pp_rank == ctx.pp - 1)
    shards = apply_tensor_parallel(model, ctx)
    fuse_projections(model)  # q/k/v and gate/up as one Linear each; loading fills their row blocks
    if device.type == "cpu":
        apply_cpu_kernels(model)  # kernel-backed modules; each call still falls back to torch's op
    model = model.to(dtype)
    if gguf is not None:  # after the cast, as below: the GGML blocks stay uint8
        apply_ggml_kinds(model, ggml_kinds(model, config, gguf), dtype)
    else:
        apply_quantization(model, quantization)  # after the cast: int8 weights and fp32 scales keep their dtypes
    model = model.to_empty(device=device).eval()
    if model.lm_head is not None and model.model.embed_tokens is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one copy; named_parameters yields it once
    return model, config, shards


def build_stage(model_dir: Path, ctx: ParallelContext, dtype: torch.dtype, device: torch.device,
                max_batch: int, max_len: int, num_blocks: int = 0,
                quantization: str = "none") -> tuple[CausalLM, float]:
    """This rank's stage model with weights loaded and KV caches allocated; returns (model, seconds).

    `num_blocks`: KV-cache blocks (model.BLOCK_SIZE tokens each); 0 or too few for max_batch x max_len
    means exactly that many (CausalLM.setup_caches). `quantization`: spec.model.quantization (runtime/quant.py).
    """
    began = time.perf_counter()
    if device.type == "cpu":
        cpu_kernels.load()  # the decode GEMV kernel: built once per machine, logged, optional
    source = gguf_file(model_dir)
    if source is not None and quantization != "gguf":
        raise ModelConfigError(f"{model_dir} serves the GGUF file {source.resolve()}: it needs quantization=gguf "
                               f"(MODEL_QUANTIZATION), not {quantization}")
    gguf = GGUFTensors.open(source) if source is not None else None
    model, config, shards = empty_stage(model_dir, ctx, dtype, device, quantization, gguf)
    if gguf is not None:
        nbytes = load_gguf_weights(model, config, gguf, shards)
        del gguf  # unmap the file: the parameters hold copies of this rank's slices
    else:
        nbytes = load_weights(model, config, Path(model_dir), shards)
    model.setup_caches(max_batch, max_len, dtype, device, num_blocks=num_blocks)
    seconds = time.perf_counter() - began
    # Issue 17: the load rate per rank (bytes of its shard over the whole build), also in status.
    metrics.MODEL_LOAD_BYTES.labels(rank=str(ctx.rank)).set(nbytes)
    metrics.MODEL_LOAD_RATE.labels(rank=str(ctx.rank)).set(nbytes / seconds if seconds > 0 else 0.0)
    layers = [int(i) for i in model.model.layers]  # global indices, in order
    log.info("event=load_done rank=%d stage=%d layers=%d-%d quantization=%s shard_mib=%.1f seconds=%.2f "
             "rate_mb_s=%.1f", ctx.rank, ctx.pp_rank, layers[0], layers[-1], quantization, nbytes / 2**20, seconds,
             nbytes / 1e6 / seconds if seconds > 0 else 0.0)
    return model, seconds


def _weight_parts(model: CausalLM, module: str) -> list[str]:
    """The checkpoint names of the row blocks of `module`'s weight (the weight itself when not fused)."""
    parent, _, leaf = module.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    parts = getattr(owner, "parts", {}).get(leaf)
    prefix = f"{parent}." if parent else ""
    return [f"{module}.weight"] if parts is None else [f"{prefix}{name}.weight" for name, _ in parts]


def load_threads() -> int:
    """Readers for the direct reads: the rank's thread budget, at least two (one thread's pages fault
    in while the other copies; measured 6.1 -> 8.2-9.1 GB/s on 2 cores, docs/PERFORMANCE.md)."""
    return min(MAX_READERS, max(2, torch.get_num_threads()))


def load_weights(model: CausalLM, config: ModelConfig, model_dir: Path, shards: dict[str, Shard]) -> int:
    """Copy every parameter's slice in from the checkpoint; returns the bytes loaded.

    Whole tensors and row shards become `READ_CHUNK` byte ranges read by `load_threads()` readers straight
    into the parameters while this thread fills the rest through `read_shard`. A fused parameter is
    filled block by block: checkpoint_tensors names each of its row blocks (views of its memory) by
    the checkpoint tensor read into it.

    An int8 weight (quant.Int8Linear) whose checkpoint tensor is a float one is read the same way, then
    quantized per row into the weight and its `weight_scale` rows; a pre-quantized checkpoint's I8
    weight and `<name>.weight_scale` are read as they are (the scales sliced like the weight's rows).
    A q4 weight (quant.GGMLLinear) is read as a float slice and quantized into its Q4_1 blocks."""
    files = checkpoint_index(model_dir)
    entries: dict[Path, dict[str, TensorEntry]] = {}
    fds: dict[Path, int] = {}
    params = checkpoint_tensors(model)
    ggml = {part: module.kind for prefix, module in model.named_modules()
            if isinstance(module, GGMLLinear) for part in _weight_parts(model, prefix)}
    scales = {name[: -len(SCALE_SUFFIX)]: t for name, t in params if name.endswith(".weight" + SCALE_SUFFIX)}
    total = sum(param.numel() * param.element_size() for _, param in params)
    done, last_log, began = 0, time.perf_counter(), time.perf_counter()
    pending: set[Future[int]] = set()

    def progress() -> None:
        nonlocal last_log
        if time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            log.info("event=load_progress loaded_mib=%.1f total_mib=%.1f elapsed_s=%.1f",
                     done / 2**20, total / 2**20, last_log - began)

    def collect(block: bool) -> None:
        nonlocal done, pending
        finished, pending = wait(pending, timeout=PROGRESS_EVERY_S if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            done += future.result()  # a failed read raises here

    readers = ThreadPoolExecutor(max_workers=load_threads(), thread_name_prefix="load")
    try:
        for name, param in params:
            key = name
            if key not in files and name == "lm_head.weight" and config.tie_word_embeddings:
                key = "model.embed_tokens.weight"
            weight_key = key[: -len(SCALE_SUFFIX)] if key.endswith(".weight" + SCALE_SUFFIX) else None
            if weight_key is not None and key not in files and weight_key in files:
                continue  # quantized at load: filled with its weight below
            if key not in files:
                raise ModelConfigError(f"checkpoint in {model_dir} has no tensor {key!r}")
            shard = shards.get(name)
            if weight_key is not None and shard is None:  # row scales: the rows its weight's shard holds
                row_shard = shards.get(name[: -len(SCALE_SUFFIX)])
                shard = row_shard if row_shard is not None and row_shard.dim == 0 else None
            file = files[key]
            nbytes = param.numel() * param.element_size()
            with torch.no_grad():
                if shard is not None and shard.zero:
                    param.zero_()
                    done += nbytes
                    continue
                if file not in entries:
                    entries[file] = safetensors_entries(file)
                    fds[file] = os.open(file, os.O_RDONLY)
                entry = entries[file].get(key)
                where = None if entry is None else direct_range(entry, shard, param)
                if where is not None:
                    offset, count = where
                    for at in range(0, count, READ_CHUNK):
                        pending.add(readers.submit(read_range, fds[file], offset + at, param.data_ptr() + at,
                                                   min(READ_CHUNK, count - at)))
                    continue
                part = read_shard(file, key, shard)
                if part.dtype == torch.int8 and param.dtype != torch.int8:
                    raise ModelConfigError(f"tensor {key!r} is int8 in the checkpoint: a pre-quantized "
                                           "checkpoint needs MODEL_QUANTIZATION=int8")
                if param.dtype == torch.uint8 and part.is_floating_point() and name in ggml:
                    blocks = cpu_kernels.ggml_quantize(part, ggml[name])  # q4: this rank's slice, whole blocks
                    if blocks.shape != param.shape:
                        raise ModelConfigError(f"tensor {key!r} has shape {tuple(part.shape)}, which does not "
                                               f"make the {ggml[name]} blocks {tuple(param.shape)}")
                    param.copy_(blocks)
                    done += nbytes
                    collect(block=False)
                    progress()
                    continue
                if param.dtype == torch.int8 and part.is_floating_point() and name in scales:
                    if part.shape != param.shape:
                        raise ModelConfigError(f"tensor {key!r} has shape {tuple(part.shape)}, "
                                               f"expected {tuple(param.shape)}")
                    q, scale = quantize_rows(part)
                    param.copy_(q)
                    scales[name].copy_(scale)
                    done += nbytes + scale.numel() * scale.element_size()
                    collect(block=False)
                    progress()
                    continue
                if part.shape != param.shape:
                    raise ModelConfigError(f"tensor {key!r} has shape {tuple(part.shape)}, expected {tuple(param.shape)}")
                param.copy_(part)
                done += nbytes
            collect(block=False)
            progress()
        while pending:
            collect(block=True)
            progress()
    finally:
        for future in pending:
            future.cancel()
        readers.shutdown(wait=True)  # no reader may write into a parameter after we return
        for fd in fds.values():
            os.close(fd)
    return total
