"""CPU decode kernels (`torch.ops.largemodel.*`): built from cpu_kernels.cpp on first use, cached, optional.

A decode step multiplies a handful of activation rows by every weight matrix once, so on CPU it is
as fast as the weights stream from memory. torch's F.linear for one row goes to MKL's GEMV (fp32) or
oneDNN (bf16), which on this project's AMD Zen 4 machines stream at about half the bus bandwidth;
`small_linear` streams them at close to it (docs/PERFORMANCE.md, "Engine"). Once the matmuls are that
fast, the small tensor ops between them are a fifth of a step: `rms_norm`/`add_rms_norm`, `silu_mul`
and `decode_attention` (RoPE + cache write + attention of one decode token) do in four calls per layer
what about thirty torch ops did, with torch's arithmetic.

`load()` compiles the C++ file with the system compiler against the installed torch into
`$LARGEMODEL_KERNEL_DIR` (default `~/.cache/largemodel/kernels`), keyed by a hash of the source, the
torch version and the flags, and loads it with `torch.ops.load_library`; a prebuilt library there
(the container image builds one) is loaded without a compiler and without writing anything.
Anything that stops it (not x86-64, no AVX-512 BF16, no compiler, a read-only directory, or
`LARGEMODEL_CPU_KERNELS=0`) is logged once and leaves torch's own ops in charge: the kernels only
ever change speed, never whether the engine runs.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CXX_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw",
             "-mavx512vl", "-mavx512bf16"]
# Activation rows up to which the kernel is the fastest path measured here; from there on arithmetic,
# not the weight stream, is the limit and oneDNN's GEMM does as well or better.
MAX_ROWS = 4

_ops: Any = None  # torch.ops.largemodel once the library is loaded
_onednn: Any = None  # torch.ops.mkldnn._linear_pointwise: oneDNN's fp32 GEMM, 1.1-2.3x MKL's on AMD Zen
_tried = False


def switched_off() -> bool:
    """LARGEMODEL_CPU_KERNELS=0 (or false/off/no): F.linear and torch's own ops everywhere."""
    return os.environ.get("LARGEMODEL_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no")


def unavailable_reason() -> str | None:
    """Why the kernel cannot run on this machine/config, or None when it can."""
    if switched_off():
        return "disabled by LARGEMODEL_CPU_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as err:
        return f"cannot read /proc/cpuinfo: {err}"
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def kernel_dir() -> Path:
    """Where the built library lives: $LARGEMODEL_KERNEL_DIR, else the user cache."""
    configured = os.environ.get("LARGEMODEL_KERNEL_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "largemodel" / "kernels"


def library_path() -> Path:
    """The cached library for this source, torch version and flag set."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CXX_FLAGS).encode())
    return kernel_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(target: Path) -> None:
    """Compile cpu_kernels.cpp into `target` (written under a temporary name, then renamed)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch.compiled_with_cxx11_abi())
    libs = library_paths()
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    cmd = [cxx, *CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-isystem{p}" for p in include_paths()),
           str(SOURCE), "-o", str(partial), *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
           "-lc10", "-ltorch_cpu"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: concurrent ranks each build, the last rename wins
    finally:
        partial.unlink(missing_ok=True)


def load() -> bool:
    """Make torch.ops.largemodel.* available (building them if needed); False if they cannot be."""
    global _ops, _onednn, _tried
    if _tried:
        return _ops is not None
    _tried = True
    _onednn = onednn_linear()
    reason = unavailable_reason()
    if reason is None:
        try:
            path = library_path()
            if not path.exists():
                log.info("event=kernel_build kernel=cpu_kernels path=%s", path)
                began = time.perf_counter()
                build(path)
                log.info("event=kernel_built kernel=cpu_kernels seconds=%.1f", time.perf_counter() - began)
            torch.ops.load_library(str(path))
            _ops = torch.ops.largemodel
            log.info("event=kernel_loaded kernel=cpu_kernels path=%s", path)
            return True
        except Exception as err:  # noqa: BLE001 - any failure only means the slower torch-op path
            reason = f"{type(err).__name__}: {err}"
    log.warning("event=kernel_unavailable kernel=cpu_kernels reason=%r fallback=torch", reason)
    return False


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; for CPU inference, small_linear up to MAX_ROWS rows and oneDNN beyond (fp32)."""
    if x.device.type == "cpu" and x.dtype == weight.dtype and not torch.is_grad_enabled():
        if (_ops is not None and x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype in (torch.float32, torch.bfloat16)
                and weight.is_contiguous()):
            return _ops.small_linear(x, weight, bias)
        if _onednn is not None and x.dtype == torch.float32:
            return _onednn(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


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
                     v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int,
                     scale: float) -> torch.Tensor:
    """One decode token per row: RoPE its q/k heads, write k/v to cache slot `slots[b]` at `positions[b]`,
    attend over that slot's positions 0..positions[b]. qkv [B, (H + 2 KV) * D] -> [B, H * D].

    Only when decode_attention_ready(); the model's tensor-op path is the reference it is tested against.
    """
    out: torch.Tensor = _ops.decode_attention(qkv, cos, sin, k_cache, v_cache, slots, positions, heads, kv_heads,
                                              scale)
    return out


class Linear(torch.nn.Linear):
    """nn.Linear whose inference forward goes through `linear` (same parameters, same state dict)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature
        return linear(input, self.weight, self.bias)


def main() -> int:
    """`python -m largemodel.runtime.cpu_kernels`: build (or find) the kernels now, report the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ok = load()
    print(f"cpu_kernels: {'ready at ' + str(library_path()) if ok else 'unavailable (torch ops are used)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
