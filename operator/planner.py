"""The model-aware planner: choose or check a tensor x pipeline layout (docs/DESIGN.md#planning).

Rules, in the order they are checked:
- TP never crosses a node: tp <= gpu.perNode.
- TP must divide the model as the chosen engine runs it (largemodel.modelfacts.tensor_problem):
  heads, KV heads (or, native engine, tp a multiple of them: KV heads replicate) and intermediateSize.
- pp <= numHiddenLayers (and pp = 1 for engine deepspeed), layers split by `largemodel.partition.split_layers` with the LM head weighed
  on the last stage (as the runtime does).
- Quantization (spec.model.quantization) needs engine native, and a blocked format (q4, gguf) needs
  each TP rank's input slice of o_proj and down_proj to be whole blocks (modelfacts.tensor_problem).
- Memory per GPU: weights of the largest stage / tp (= M/(tp*pp) for an even split; M in the served
  bytes: modelfacts.weight_bytes, quantized linears with their scales, the rest in dtype) + KV cache for
  maxBatchSize x maxModelLen over that stage's layers with KV heads sharded by tp + OVERHEAD_GIB
  must be <= gpu.memoryGiB * MEMORY_UTILIZATION.
`auto` picks the fewest nodes per group, then the fewest stages, then the fewest GPUs, and reports
what it rejected and why.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from largemodel import envcontract, modelfacts
from largemodel.operator import api
from largemodel.operator.modelconfig import ModelConfigError, architecture_from_config, inspect_model
from largemodel.partition import lm_head_layers, split_layers

# Share of gpu.memoryGiB the engine may plan to use; the rest absorbs allocator fragmentation.
MEMORY_UTILIZATION = 0.90
# Per-GPU memory outside weights and KV cache: CUDA context, NCCL buffers, activations, logits.
OVERHEAD_GIB = 2.0
GIB = 1024**3
SUPPORTED_URI_SCHEMES = ("pvc", "file", "hf")


class PlanError(ValueError):
    """The layout cannot work; the message says why and lists the valid choices."""


@dataclass(frozen=True)
class Rejection:
    """A layout the planner considered and turned down."""

    tp: int
    pp: int
    why: str


@dataclass(frozen=True)
class Plan:
    """A checked layout and what it costs per GPU."""

    tp: int
    pp: int
    micro_batches: int
    replicas: int
    layers_per_stage: tuple[int, ...]
    weight_gib_per_gpu: float
    kv_cache_gib_per_gpu: float
    kv_cache_blocks: int = 0
    overhead_gib: float = OVERHEAD_GIB
    usable_gib_per_gpu: float = 0.0
    memory_utilization: float = MEMORY_UTILIZATION
    warnings: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = field(default_factory=tuple)
    parameters: float = 0.0
    parameters_source: str = "spec"
    quantization: str = "none"
    weight_bytes_per_param: float = 0.0

    @property
    def gpus_per_group(self) -> int:
        """GPUs of one rank group: tp per pod, pp pods."""
        return self.tp * self.pp

    @property
    def total_gpus(self) -> int:
        """GPUs of all replicas."""
        return self.gpus_per_group * self.replicas

    @property
    def bubble(self) -> float:
        """Pipeline bubble (pp - 1) / microBatches."""
        return (self.pp - 1) / self.micro_batches

    @property
    def gib_per_gpu(self) -> float:
        """Everything one GPU holds: weights + KV cache + overhead."""
        return self.weight_gib_per_gpu + self.kv_cache_gib_per_gpu + self.overhead_gib

    def to_status(self) -> api.PlanStatus:
        """The status.plan block."""
        return api.PlanStatus(
            tensor=self.tp,
            pipeline=self.pp,
            gpusPerGroup=self.gpus_per_group,
            layersPerStage=list(self.layers_per_stage),
            weightGiBPerGPU=round(self.weight_gib_per_gpu, 2),
            kvCacheGiBPerGPU=round(self.kv_cache_gib_per_gpu, 2),
            kvCacheBlocks=self.kv_cache_blocks,
            bubble=round(self.bubble, 4),
            parameters=self.parameters,
            parametersSource=self.parameters_source,
            quantization=self.quantization,
            weightBytesPerParam=round(self.weight_bytes_per_param, 4),
            warnings=list(self.warnings),
            rejected=[api.RejectedLayout(tensor=r.tp, pipeline=r.pp, why=r.why) for r in self.rejected],
        )


def resolve_architecture(spec: api.LargeModelSpec) -> api.Architecture:
    """spec.model.architecture, else read from config.json for a file:// URI."""
    if spec.model.architecture is not None:
        return spec.model.architecture
    parsed = urlparse(spec.model.uri)
    if parsed.scheme == "file":
        try:
            header = gguf_header(spec.model.uri)
            if header is not None:
                arch = architecture_from_config(header.config())
                return arch.model_copy(update={"parameters": float(header.parameters)})
            return inspect_model(Path(parsed.path))
        except ModelConfigError as err:
            raise PlanError(str(err)) from None
    raise PlanError(
        f"spec.model.architecture is required for {spec.model.uri} (the planner reads config.json only "
        "for file:// URIs); `largemodel inspect config.json` prints the block"
    )


def _check_model_uri(uri: str) -> None:
    """The schema admits s3:// for later; the runtime cannot load it yet, so no pod should start."""
    scheme = urlparse(uri).scheme
    if scheme not in SUPPORTED_URI_SCHEMES:
        supported = ", ".join(f"{s}://" for s in SUPPORTED_URI_SCHEMES)
        raise PlanError(f"model.uri scheme {scheme}:// is not supported yet ({uri}); use {supported}")


def gguf_header(uri: str) -> modelfacts.GGUFHeader | None:
    """The header of a file:// .gguf source (read once per file version), else None: the operator
    cannot read pvc:// or hf:// sources, so their GGUF bytes are estimated (modelfacts.linear_bytes)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or not modelfacts.is_gguf_uri(uri):
        return None
    path = Path(parsed.path)
    try:
        stat = path.stat()
    except OSError as err:
        raise ModelConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    return _read_gguf_header(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_gguf_header(path: Path, mtime_ns: int, size: int) -> modelfacts.GGUFHeader:
    return modelfacts.read_gguf_header(path)


def _gguf_header(spec: api.LargeModelSpec) -> modelfacts.GGUFHeader | None:
    if spec.model.quantization != "gguf":
        return None
    try:
        return gguf_header(spec.model.uri)
    except ModelConfigError as err:
        raise PlanError(str(err)) from None


def weight_bytes(spec: api.LargeModelSpec, arch: api.Architecture) -> float:
    """Bytes of all weights as the engine holds them: dtype, int8/q4 linears with scales, or the GGUF's tensors."""
    header = _gguf_header(spec)
    return modelfacts.weight_bytes(
        parameters=arch.parameter_total, hidden=arch.hidden_size, intermediate=arch.intermediate_size,
        layers=arch.num_hidden_layers, heads=arch.num_attention_heads, kv_heads=arch.num_key_value_heads,
        head_dim=arch.kv_head_dim, dtype_bytes=api.DTYPE_BYTES[spec.model.dtype],
        quantization=spec.model.quantization, gguf_bytes=header.tensor_bytes if header else None)


def stage_split(arch: api.Architecture, pp: int) -> list[int]:
    """Layers per pipeline stage: the runtime's split (the LM head weighed on the last stage)."""
    head = lm_head_layers(arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.num_attention_heads,
                          arch.num_key_value_heads, arch.kv_head_dim)
    return split_layers(arch.num_hidden_layers, pp, head)


def _memory(spec: api.LargeModelSpec, arch: api.Architecture, tp: int, pp: int) -> tuple[float, float]:
    """(weight GiB, KV-cache GiB) on the GPUs of the largest stage."""
    dtype_bytes = api.DTYPE_BYTES[spec.model.dtype]
    stage_layers = max(stage_split(arch, pp))
    share = stage_layers / arch.num_hidden_layers
    weights = weight_bytes(spec, arch) * share / tp / GIB
    # K and V, per token per layer, with the KV heads this rank holds.
    kv_per_token_layer = 2 * modelfacts.kv_heads_per_rank(arch.num_key_value_heads, tp) * arch.kv_head_dim * dtype_bytes
    tokens = spec.serving.max_batch_size * spec.serving.max_model_len
    kv = kv_per_token_layer * stage_layers * tokens / GIB
    return weights, kv


def usable_gib(spec: api.LargeModelSpec) -> float:
    """GPU memory the plan may fill: gpu.memoryGiB x MEMORY_UTILIZATION."""
    return spec.gpu.memory_gib * MEMORY_UTILIZATION


def valid_tensor_sizes(spec: api.LargeModelSpec, arch: api.Architecture) -> list[int]:
    """tp values that satisfy the node and head rules (memory aside)."""
    return [tp for tp in range(1, spec.gpu.per_node + 1) if _tensor_problem(spec, arch, tp) is None]


def _tensor_problem(spec: api.LargeModelSpec, arch: api.Architecture, tp: int) -> str | None:
    if tp > spec.gpu.per_node:
        return f"tensor={tp} exceeds gpu.perNode={spec.gpu.per_node} (tensor parallelism never crosses a node)"
    # The runtime's own rule for the chosen engine (largemodel.modelfacts): admitted means it runs.
    header = _gguf_header(spec)
    return modelfacts.tensor_problem(heads=arch.num_attention_heads, kv_heads=arch.num_key_value_heads,
                                     intermediate=arch.intermediate_size, tp=tp, engine=spec.engine,
                                     quantization=spec.model.quantization, head_dim=arch.kv_head_dim,
                                     hidden=arch.hidden_size, block=header.linear_block if header else None)


def _pipeline_problem(spec: api.LargeModelSpec, arch: api.Architecture, pp: int) -> str | None:
    return modelfacts.pipeline_problem(layers=arch.num_hidden_layers, pp=pp, engine=spec.engine)


def _memory_problem(spec: api.LargeModelSpec, arch: api.Architecture, tp: int, pp: int) -> str | None:
    weights, kv = _memory(spec, arch, tp, pp)
    need = weights + kv + OVERHEAD_GIB
    limit = usable_gib(spec)
    if need <= limit:
        return None
    return (
        f"needs {need:.1f} GiB per GPU (weights {weights:.1f} + KV cache {kv:.1f} + overhead {OVERHEAD_GIB:.1f})"
        f" > {limit:.1f} GiB usable (gpu.memoryGiB={spec.gpu.memory_gib:g} x {MEMORY_UTILIZATION:g})"
    )


def _smallest_fitting_pp(spec: api.LargeModelSpec, arch: api.Architecture, tp: int) -> int | None:
    for pp in range(1, arch.num_hidden_layers + 1):
        if _pipeline_problem(spec, arch, pp) is None and _memory_problem(spec, arch, tp, pp) is None:
            return pp
    return None


def _fitting_layouts(spec: api.LargeModelSpec, arch: api.Architecture) -> str:
    """The cheapest fitting pipeline size per valid tensor size, for error messages."""
    choices = []
    for tp in valid_tensor_sizes(spec, arch):
        pp = _smallest_fitting_pp(spec, arch, tp)
        if pp is not None:
            choices.append(f"tensor={tp} pipeline>={pp}")
    return "; ".join(choices) if choices else "none (the model does not fit these GPUs at any layout)"


def nodes_per_group(spec: api.LargeModelSpec, tp: int, pp: int) -> int:
    """Nodes one group needs: each stage is a pod of tp GPUs on one node, perNode // tp of them per node."""
    return -(-pp // max(1, spec.gpu.per_node // tp))


def _candidates(spec: api.LargeModelSpec, arch: api.Architecture) -> Iterator[tuple[int, int]]:
    """Every (tp, pp) the spec allows, in the order practitioners prefer: fewest nodes per group, then
    fewest pipeline stages (TP fills a node before PP is added: PP adds latency and bubbles, TP divides
    each token's weight reads), then fewest GPUs."""
    par = spec.parallelism
    tps = [par.tensor] if isinstance(par.tensor, int) else list(range(1, spec.gpu.per_node + 1))
    pps = [par.pipeline] if isinstance(par.pipeline, int) else [
        pp for pp in range(1, arch.num_hidden_layers + 1) if _pipeline_problem(spec, arch, pp) is None]
    yield from sorted(((tp, pp) for tp in tps for pp in pps),
                      key=lambda lay: (nodes_per_group(spec, *lay), lay[1], lay[0] * lay[1]))


def _check_fixed(spec: api.LargeModelSpec, arch: api.Architecture) -> None:
    """Reject an explicit tensor or pipeline size that breaks a structural rule, listing valid ones."""
    par = spec.parallelism
    if isinstance(par.tensor, int):
        problem = _tensor_problem(spec, arch, par.tensor)
        if problem:
            valid = ", ".join(str(t) for t in valid_tensor_sizes(spec, arch))
            raise PlanError(f"{problem}; valid tensor sizes: {valid}")
    if isinstance(par.pipeline, int):
        problem = _pipeline_problem(spec, arch, par.pipeline)
        if problem:
            valid = "1" if spec.engine == "deepspeed" else f"1..{arch.num_hidden_layers}"
            raise PlanError(f"{problem}; valid pipeline sizes: {valid}")


def _choose(spec: api.LargeModelSpec, arch: api.Architecture) -> tuple[int, int, list[Rejection]]:
    """First fitting candidate, with the rejections worth telling the user (one per tp)."""
    par = spec.parallelism
    rejected: dict[int, Rejection] = {}
    if not isinstance(par.tensor, int):
        for tp in range(1, spec.gpu.per_node + 1):
            problem = _tensor_problem(spec, arch, tp)
            if problem:
                rejected[tp] = Rejection(tp, 1, problem + " (any pipeline)")
    for tp, pp in _candidates(spec, arch):
        if tp in rejected and _tensor_problem(spec, arch, tp):
            continue
        problem = _memory_problem(spec, arch, tp, pp)
        if problem is None:
            return tp, pp, sorted(rejected.values(), key=lambda r: (r.tp, r.pp))
        # Keep the largest pp that failed for this tp: the nearest miss explains the choice best.
        rejected[tp] = Rejection(tp, pp, problem)
    if isinstance(par.tensor, int) and isinstance(par.pipeline, int):
        raise PlanError(
            f"tensor={par.tensor} pipeline={par.pipeline} does not fit: "
            f"{rejected[par.tensor].why}; layouts that fit: {_fitting_layouts(spec, arch)}"
        )
    raise PlanError(f"no layout fits the requested parallelism; layouts that fit: {_fitting_layouts(spec, arch)}")


def _warnings(spec: api.LargeModelSpec, tp: int, pp: int) -> list[str]:
    mb = spec.parallelism.micro_batches
    out = []
    if spec.model.quantization == "gguf" and _gguf_header(spec) is None:
        out.append(
            f"quantization=gguf: the planner cannot read {spec.model.uri} (it reads file:// sources only), so "
            "the linears are counted as Q8_0 (34 bytes per 32 weights) and the rest in dtype, and a block of 32 "
            "weights is assumed; a K-quant file (blocks of 256) may need a smaller tensor size")
    # With one stage there is no bubble, so few micro-batches cost nothing.
    if pp > 1 and mb < 4 * pp:
        out.append(
            f"microBatches={mb} < 4*pipeline={4 * pp}: pipeline bubble (pipeline-1)/microBatches = "
            f"{(pp - 1) / mb:.2f}; use microBatches >= {4 * pp} to keep stages busy"
        )
    if mb > spec.serving.max_batch_size:
        out.append(
            f"microBatches={mb} > serving.maxBatchSize={spec.serving.max_batch_size}: "
            "some micro-batches will always be empty"
        )
    return out


def plan_parallelism(spec: api.LargeModelSpec, arch: api.Architecture | None = None) -> Plan:
    """Check (explicit sizes) or choose (`auto`) the layout for `spec`; raise PlanError if none works."""
    _check_model_uri(spec.model.uri)
    arch = arch or resolve_architecture(spec)
    _check_fixed(spec, arch)
    tp, pp, rejected = _choose(spec, arch)
    weights, kv = _memory(spec, arch, tp, pp)
    total_bytes = weight_bytes(spec, arch)
    return Plan(
        tp=tp,
        pp=pp,
        micro_batches=spec.parallelism.micro_batches,
        replicas=spec.replicas,
        layers_per_stage=tuple(stage_split(arch, pp)),
        weight_gib_per_gpu=weights,
        kv_cache_gib_per_gpu=kv,
        kv_cache_blocks=envcontract.kv_cache_blocks_for(spec.serving.max_batch_size, spec.serving.max_model_len),
        usable_gib_per_gpu=usable_gib(spec),
        warnings=tuple(_warnings(spec, tp, pp)),
        rejected=tuple(rejected),
        parameters=arch.parameter_total,
        parameters_source="spec" if arch.parameters is not None else "shapes",
        quantization=spec.model.quantization,
        weight_bytes_per_param=total_bytes / arch.parameter_total,
    )
