"""CPU decode kernels (`torch.ops.largemodel_<level>.*`): built from cpu_kernels.cpp on first use, cached, optional.

A decode step multiplies a handful of activation rows by every weight matrix once, so on CPU it is
as fast as the weights stream from memory. torch's F.linear for one row goes to MKL's GEMV (fp32) or
oneDNN (bf16), which on AVX-512 AMD Zen 4 machines streamed at about half the bus bandwidth where
`small_linear` streamed at close to it (docs/PERFORMANCE.md, "Engine"); on an AVX2 Zen 3 host the two
measured about equal at one thread (docs/PERFORMANCE.md, "Engine", run C1). Once the matmuls are that
fast, the small tensor ops between them are a fifth of a step: `rms_norm`/`add_rms_norm`, `silu_mul`
and `decode_attention` (RoPE + cache write + attention of one decode token) do in four calls per layer
what about thirty torch ops did, with torch's arithmetic.

The C++ source is one file written with GCC/Clang vector extensions, compiled once per instruction-set
level (`LEVELS`: avx512, avx2, neon, generic); `load()` picks the best level this CPU runs (its
/proc/cpuinfo flags; `LARGEMODEL_CPU_KERNELS_ISA=<level>` asks for a lower one), compiles it with the
system compiler against the installed torch into `$LARGEMODEL_KERNEL_DIR` (default
`~/.cache/largemodel/kernels`) as `cpu_kernels-<level>-<hash>.so`, keyed by the source, the torch
version and the flags, and loads it with `torch.ops.load_library`; a prebuilt library there (the
runtime image ships every level, `python -m largemodel.runtime.cpu_kernels --all`) is loaded without a
compiler and without writing anything. If a level fails to build or load the next lower one is tried;
if none can (no compiler, a read-only directory, or `LARGEMODEL_CPU_KERNELS=0`) that is logged once and
torch's own ops stay in charge: the kernels only ever change speed, never whether the engine runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
CXX_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]


@dataclass(frozen=True)
class Level:
    """One instruction-set level the source compiles for: its compiler flags and the CPU flags it needs."""

    name: str
    machines: tuple[str, ...]  # platform.machine() values it compiles for; () = any
    cxx_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo "flags" (x86) or "Features" (Arm) it needs


# Best first. `generic` is the same source with no ISA flags (SSE2 on x86-64, the baseline elsewhere).
LEVELS = (
    Level("avx512", ("x86_64", "amd64"), ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"),
          ("avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c")),
    Level("avx2", ("x86_64", "amd64"), ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    Level("neon", ("aarch64", "arm64"), (), ("asimd",)),
    Level("generic", (), (), ()),
)
BY_NAME = {level.name: level for level in LEVELS}
# Activation rows up to which the kernel is the fastest path measured here; from there on arithmetic,
# not the weight stream, is the limit and oneDNN's GEMM does as well or better.
MAX_ROWS = 4
# Activation rows up to which int8_linear's kernel runs (it widens each int8 weight once per 4 rows);
# beyond, the weight is dequantized in row chunks for oneDNN/MKL's GEMM (see int8_linear).
INT8_MAX_ROWS = 16
INT8_CHUNK_ELEMENTS = 2**22  # weight elements dequantized at a time by the fallback (16 MiB of fp32)

_ops: Any = None  # torch.ops.largemodel_<level> of the level in use
_level: str | None = None
_loaded: dict[str, Any] = {}  # level -> its ops namespace, for every library loaded in this process
_onednn: Any = None  # torch.ops.mkldnn._linear_pointwise: oneDNN's fp32 GEMM, 1.1-2.3x MKL's on AMD Zen
_tried = False


def switched_off() -> bool:
    """LARGEMODEL_CPU_KERNELS=0 (or false/off/no): F.linear and torch's own ops everywhere."""
    return os.environ.get("LARGEMODEL_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no")


def unavailable_reason() -> str | None:
    """Why the kernels are not to be used in this process, or None when they may be."""
    return "disabled by LARGEMODEL_CPU_KERNELS" if switched_off() else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty if unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines
                 if line.split(":", 1)[0].strip() in ("flags", "Features")), set())


def compiles_here(level: Level) -> bool:
    """Whether the host compiler targets this level (its architecture matches this machine's)."""
    return not level.machines or platform.machine().lower() in level.machines


def host_levels() -> list[str]:
    """The levels this machine can compile and run, best first (always ends with generic)."""
    flags = cpu_flags()
    return [lv.name for lv in LEVELS if compiles_here(lv) and all(f in flags for f in lv.cpu_flags)]


def buildable_levels() -> list[str]:
    """The levels the host compiler can build for this architecture (what an image prebuilds)."""
    return [lv.name for lv in LEVELS if compiles_here(lv)]


def wanted_levels() -> list[str]:
    """The levels load() tries, in order: the best this CPU runs, or from LARGEMODEL_CPU_KERNELS_ISA down."""
    runnable = host_levels()
    asked = os.environ.get("LARGEMODEL_CPU_KERNELS_ISA", "").strip().lower()
    if asked and asked != "auto":
        if asked not in runnable:
            log.warning("event=kernel_isa_ignored requested=%s runnable=%s", asked, ",".join(runnable))
        else:
            return runnable[runnable.index(asked):]
    return runnable


def kernel_dir() -> Path:
    """Where the built library lives: $LARGEMODEL_KERNEL_DIR, else the user cache."""
    configured = os.environ.get("LARGEMODEL_KERNEL_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "largemodel" / "kernels"


def level_flags(level: str) -> list[str]:
    """The full compiler flag list for one level (part of the library's cache key)."""
    return [*CXX_FLAGS, *BY_NAME[level].cxx_flags, f"-DLARGEMODEL_ISA_{level.upper()}",
            f"-DLARGEMODEL_NS=largemodel_{level}"]


def library_path(level: str | None = None) -> Path:
    """The cached library of one level (default: the first load() tries) for this source, torch and flags.

    Keyed by torch's release without its local build tag (2.8.0, not 2.8.0+cpu or +cu128): a CPU-only
    extension uses the same C++ API in every build variant of a release, so the image can build the
    libraries against the CPU wheel and load them under its CUDA torch.
    """
    level = level or wanted_levels()[0]
    release = torch.__version__.split("+")[0] + f" cxx11abi={int(torch.compiled_with_cxx11_abi())}"
    key = hashlib.sha256(SOURCE.read_bytes() + release.encode() + " ".join(level_flags(level)).encode())
    return kernel_dir() / f"cpu_kernels-{level}-{key.hexdigest()[:16]}.so"


def compile_command(level: str, output: Path, cxx: str, link: bool = True) -> list[str]:
    """The compiler command that builds one level's library (link=False: an object file, no torch libraries)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch.compiled_with_cxx11_abi())
    flags = level_flags(level) if link else [f for f in level_flags(level) if f != "-shared"] + ["-c"]
    cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-isystem{p}" for p in include_paths()),
           str(SOURCE), "-o", str(output)]
    if link:
        libs = library_paths()
        cmd += [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]
    return cmd


def build(target: Path, level: str | None = None) -> None:
    """Compile cpu_kernels.cpp for one level into `target` (written under a temporary name, then renamed)."""
    level = level or wanted_levels()[0]
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        result = subprocess.run(compile_command(level, partial, cxx), capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
        # The temporary file was created 0600 and the linker keeps that (adding x): other users, such as
        # the image's non-root rank user loading kernels root built, could then not map the library.
        os.chmod(partial, 0o755)
        os.replace(partial, target)  # atomic: concurrent ranks each build, the last rename wins
    finally:
        partial.unlink(missing_ok=True)


def load_level(level: str) -> Any:
    """torch.ops.largemodel_<level>, building and loading that level's library if needed; raises if it cannot.

    Only for levels in host_levels(): a library for an instruction set the CPU lacks would crash on first use.
    """
    if level in _loaded:
        return _loaded[level]
    if level not in host_levels():
        raise RuntimeError(f"this CPU cannot run the {level} kernels (it runs {', '.join(host_levels())})")
    path = library_path(level)
    if not path.exists():
        log.info("event=kernel_build kernel=cpu_kernels level=%s path=%s", level, path)
        began = time.perf_counter()
        build(path, level)
        log.info("event=kernel_built kernel=cpu_kernels level=%s seconds=%.1f", level, time.perf_counter() - began)
    torch.ops.load_library(str(path))
    _loaded[level] = getattr(torch.ops, f"largemodel_{level}")
    log.info("event=kernel_loaded kernel=cpu_kernels level=%s path=%s", level, path)
    return _loaded[level]


def load() -> bool:
    """Make the best level's torch.ops.largemodel_<level>.* available (building if needed); False if none can be."""
    global _ops, _level, _onednn, _tried
    if _tried:
        return _ops is not None
    _tried = True
    _onednn = onednn_linear()
    reason = unavailable_reason()
    if reason is None:
        failures = []
        for level in wanted_levels():
            try:
                _ops, _level = load_level(level), level
                return True
            except Exception as err:  # noqa: BLE001 - any failure only means a lower level or torch ops
                failures.append(f"{level}: {type(err).__name__}: {err}")
                if "no C++ compiler" in str(err):
                    break
        reason = "; ".join(failures)
    log.warning("event=kernel_unavailable kernel=cpu_kernels reason=%r fallback=torch", reason)
    return False


def level() -> str | None:
    """The instruction-set level whose kernels are in use, or None (torch ops)."""
    return _level if _ops is not None else None


def onednn_linear() -> Any:
    """torch's oneDNN linear op when this torch build has one that works, else None.

    For fp32 matmuls with more rows than small_linear takes (batched decode, prefill) oneDNN's GEMM
    measured 1.1-2.3x MKL's (F.linear) on this project's AMD Zen 4 machines, where MKL does not use
    its AVX-512 paths; in bf16 F.linear already goes to oneDNN.
    """
    if switched_off():
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        with torch.inference_mode():
            ok = torch.equal(op(x, w, None, "none", [], ""), torch.full((2, 4), 3.0))
        return op if ok else None
    except (AttributeError, RuntimeError):
        return None


@contextmanager
def disabled() -> Iterator[None]:
    """Route every call to torch's own ops (F.linear, ...) inside the block (benchmarks compare both in one run)."""
    global _ops, _onednn
    saved, _ops, _onednn = (_ops, _onednn), None, None
    try:
        yield
    finally:
        _ops, _onednn = saved


@contextmanager
def using(name: str) -> Iterator[Any]:
    """Route every kernel call to one level's library inside the block (tests and benchmarks compare levels)."""
    global _ops, _level, _onednn
    ops = load_level(name)
    saved = (_ops, _level, _onednn)
    _ops, _level, _onednn = ops, name, onednn_linear()
    try:
        yield ops
    finally:
        _ops, _level, _onednn = saved


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; for CPU inference, small_linear up to MAX_ROWS rows and oneDNN beyond (fp32)."""
    if x.device.type == "cpu" and x.dtype == weight.dtype and not torch.is_grad_enabled():
        if (_ops is not None and x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype in (torch.float32, torch.bfloat16)
                and weight.is_contiguous()):
            return _ops.small_linear(x, weight, bias)
        if _onednn is not None and x.dtype == torch.float32:
            return _onednn(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T (+ bias) for an int8 weight [out, in] and fp32 row scales [out].

    CPU inference up to INT8_MAX_ROWS rows: the int8_linear kernel. Otherwise (more rows, no kernels,
    another device or dtype) each chunk of INT8_CHUNK_ELEMENTS weights is dequantized to x's dtype and
    multiplied by `linear` (oneDNN on CPU), so no full-size float copy of the weight ever exists.
    """
    rows = x.numel() // max(1, x.shape[-1])
    if (_ops is not None and x.device.type == "cpu" and rows <= INT8_MAX_ROWS and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
        return _ops.int8_linear(x, weight, scale, bias)
    out, inner = weight.shape
    step = max(1, INT8_CHUNK_ELEMENTS // max(1, inner))
    parts = []
    for r0 in range(0, out, step):
        w = weight[r0:r0 + step].to(x.dtype) * scale[r0:r0 + step, None].to(x.dtype)
        parts.append(linear(x, w, None if bias is None else bias[r0:r0 + step]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# GGML block formats (issue 19): a quantized [out, in] weight is uint8 [out, (in / 32) * block bytes], each
# row its blocks along `in` exactly as a GGUF file stores them, so a TP slice of rows (column-parallel) or
# of whole blocks (row-parallel, in % (32 * tp) == 0) is a plain view of the file's bytes.
#   Q4_1 (20 bytes per 32 weights): fp16 d, fp16 m, 16 bytes qs; weight j = d * q_j + m with q_j the low
#        nibble of qs[j] for j < 16 and the high nibble of qs[j - 16] otherwise.
#   Q8_0 (34 bytes per 32 weights): fp16 d, 32 int8 qs; weight j = d * qs[j].
GGML_BLOCK = 32
GGML_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
GGML_MAX_ROWS = 16  # activation rows up to which the block kernels run; beyond, chunked dequantize + GEMM


def _ggml_blocks(q: torch.Tensor, kind: str) -> torch.Tensor:
    """q uint8 [out, nb * bytes] -> [out, nb, bytes] (ValueError on a width that is not whole blocks)."""
    if kind not in GGML_BLOCK_BYTES:
        raise ValueError(f"unknown GGML block kind {kind!r} (known: {', '.join(GGML_BLOCK_BYTES)})")
    size = GGML_BLOCK_BYTES[kind]
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % size:
        raise ValueError(f"{kind} weight must be uint8 [out, blocks * {size}], got {q.dtype} {tuple(q.shape)}")
    return q.reshape(q.shape[0], q.shape[1] // size, size)


def ggml_dequantize(q: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 [out, in] a GGML Q4_1 or Q8_0 weight holds (the exact reference for the kernels)."""
    blocks = _ggml_blocks(q, kind)
    d = blocks[..., 0:2].contiguous().view(torch.float16).to(torch.float32)  # [out, nb, 1]
    if kind == "q8_0":
        return (blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32) * d).reshape(q.shape[0], -1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
    qs = blocks[..., 4:]
    nibbles = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(torch.float32)  # weights 0-15, then 16-31
    return (nibbles * d + m).reshape(q.shape[0], -1)


def ggml_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32 [out, in] (in % 32 == 0) -> the uint8 GGML blocks, rounding as ggml's reference quantizers do."""
    w = weight.detach().to(torch.float32)
    out, inner = w.shape
    if inner % GGML_BLOCK:
        raise ValueError(f"{kind} needs the input width to be a multiple of {GGML_BLOCK}, got {inner}")
    x = w.reshape(out, inner // GGML_BLOCK, GGML_BLOCK)
    if kind == "q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127.0
        qs = torch.round(x / torch.where(d > 0, d, 1.0)).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        head = d.to(torch.float16).view(torch.uint8)
        return torch.cat((head, qs), dim=-1).reshape(out, -1).contiguous()
    lo = x.amin(dim=-1, keepdim=True)
    d = (x.amax(dim=-1, keepdim=True) - lo) / 15.0
    q = torch.floor((x - lo) / torch.where(d > 0, d, 1.0) + 0.5).clamp_(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    head = torch.cat((d.to(torch.float16).view(torch.uint8), lo.to(torch.float16).view(torch.uint8)), dim=-1)
    return torch.cat((head, qs), dim=-1).reshape(out, -1).contiguous()


def ggml_linear(x: torch.Tensor, q: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ ggml_dequantize(q, kind).T (+ bias): a Q4_1 or Q8_0 weight [out, in] in its GGML blocks.

    CPU inference up to GGML_MAX_ROWS rows of fp32/bf16: the q4_1_linear/q8_0_linear kernel, which
    widens each block to fp32 in registers (the activations stay fp32). Otherwise (more rows, no
    kernels, another device or dtype) each chunk of INT8_CHUNK_ELEMENTS weights is dequantized to x's
    dtype and multiplied by `linear` (oneDNN on CPU), so no full-size float copy of the weight ever exists.
    """
    _ggml_blocks(q, kind)  # the same ValueError on a bad weight on both paths
    rows = x.numel() // max(1, x.shape[-1])
    if (_ops is not None and x.device.type == "cpu" and rows <= GGML_MAX_ROWS and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16) and q.is_contiguous()):
        return getattr(_ops, f"{kind}_linear")(x, q, bias)
    out = q.shape[0]
    inner = q.shape[1] // GGML_BLOCK_BYTES[kind] * GGML_BLOCK
    step = max(1, INT8_CHUNK_ELEMENTS // max(1, inner))
    parts = []
    for r0 in range(0, out, step):
        w = ggml_dequantize(q[r0:r0 + step], kind).to(x.dtype)
        parts.append(linear(x, w, None if bias is None else bias[r0:r0 + step]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _fused(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """The fused kernels take these CPU inference tensors (one dtype, fp32 or bf16)."""
    return (_ops is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == x.dtype for t in others) and not torch.is_grad_enabled())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (fp32 math, rounded to x's dtype, then times the weight), fused on CPU."""
    if _fused(x, weight):
        return _ops.rms_norm(x, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) for h = x + delta: a residual add and the norm after it, in one pass on CPU."""
    if _fused(x, delta, weight) and x.shape == delta.shape:
        h, normed = _ops.add_rms_norm(x, delta, weight, eps)
        return h, normed
    h = x + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused gate/up projection output [..., 2I] (gate first) -> [..., I]."""
    if _fused(gate_up):
        return _ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def decode_attention_ready(x: torch.Tensor) -> bool:
    """Whether `decode_attention` may run for activations like x (CPU inference, fp32/bf16, kernels loaded)."""
    return _fused(x)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, index: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int,
                     scale: float) -> torch.Tensor:
    """One decode token per row: RoPE its q/k heads, write k/v to the paged cache ([KV, cache_len, D]) at
    index[b, positions[b]], attend over the row's positions 0..positions[b] (at index[b, :positions[b]+1]).
    qkv [B, (H + 2 KV) * D] -> [B, H * D].

    Only when decode_attention_ready(); the model's tensor-op path is the reference it is tested against.
    """
    out: torch.Tensor = _ops.decode_attention(qkv, cos, sin, k_cache, v_cache, index, positions, heads, kv_heads,
                                              scale)
    return out


DECODE_LAYER_PARAMS = 14  # tensors per layer decode_layers takes (see cpu_kernels.cpp)


def decode_layers(x: torch.Tensor, params: list[torch.Tensor], k_caches: list[torch.Tensor],
                  v_caches: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor,
                  positions: torch.Tensor, heads: int, kv_heads: int, scale: float, eps: float) -> torch.Tensor:
    """A stage's decoder layers for one decode token per row, x [B, hidden] -> [B, hidden], in one kernel
    call: bit-for-bit what the kernel-backed modules compute layer by layer (transforms.KernelCausalLM
    decides when it applies). `params`: DECODE_LAYER_PARAMS per layer, in the order the kernel reads."""
    out: torch.Tensor = _ops.decode_layers(x, params, k_caches, v_caches, cos, sin, index, positions, heads,
                                           kv_heads, scale, eps)
    return out

class Linear(torch.nn.Linear):
    """nn.Linear whose inference forward goes through `linear` (same parameters, same state dict)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature
        return linear(input, self.weight, self.bias)


def main(argv: list[str] | None = None) -> int:
    """`python -m largemodel.runtime.cpu_kernels [--all]`: build (or find) the kernels now, report the outcome."""
    parser = argparse.ArgumentParser(prog="python -m largemodel.runtime.cpu_kernels", description=main.__doc__)
    parser.add_argument("--all", action="store_true",
                        help="build every level this compiler targets (a container image's prebuilt set), "
                             "including ones this CPU cannot run; exit 1 if any fails")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.all:
        failed = 0
        for name in buildable_levels():
            path = library_path(name)
            try:
                if not path.exists():
                    build(path, name)
                print(f"cpu_kernels: {name} built at {path}")
            except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
                failed += 1
                print(f"cpu_kernels: {name} failed: {err}")
        return 1 if failed else 0
    ok = load()
    print(f"cpu_kernels: {f'{_level} ready at {library_path(_level)}' if ok else 'unavailable (torch ops are used)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
