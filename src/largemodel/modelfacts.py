"""What a Llama-family decoder is and which layouts can run it: one torch-free home for both halves.

The operator's planner and `largemodel inspect` read the same config.json, apply the same head and
bias rules, count the same parameters and ask the same `tensor_problem`/`pipeline_problem` questions
as the runtime that later builds the model, so the planner admits exactly the layouts a pod can run
(tests/src/test_layout_agreement.py sweeps layouts through both).

Supported: Llama 2/3, Mistral, Qwen2 and SmolLM (model_type llama), i.e. RMSNorm, RoPE (default,
linear, llama3), grouped-query attention, SwiGLU, tied or untied embeddings, optional q/k/v bias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from largemodel.envcontract import QUANTIZATIONS
from largemodel.partition import lm_head_layers

# model_type -> the family name users know; SmolLM ships as model_type "llama".
SUPPORTED_MODEL_TYPES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ENGINES = ("native", "deepspeed")


class ModelConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model the runtime cannot run; says why."""


class ModelConfig(BaseModel):
    """The fields of a Hugging Face config.json that shape the decoder (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_type: str = "llama"
    architectures: list[str] = Field(default_factory=list)
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    head_dim: int | None = Field(default=None, ge=1)
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    eos_token_id: int | list[int] | None = None
    use_sliding_window: bool = False

    @property
    def kv_heads(self) -> int:
        """KV heads (equal to attention heads when the config predates GQA)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head width; explicit `head_dim` wins over hidden_size / heads as in transformers."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def head_layers(self) -> float:
        """The LM head's weight in decoder layers: what the pipeline split adds to the last stage."""
        return lm_head_layers(self.hidden_size, self.intermediate_size, self.vocab_size, self.num_attention_heads,
                              self.kv_heads, self.head_size)

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v bias; Llama has it when attention_bias is set."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Llama's attention_bias also puts a bias on o_proj; Qwen2's o_proj has none."""
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def parameters(self) -> int:
        """Parameters computed from the tensor shapes; tied embeddings are counted once."""
        return parameter_count(
            hidden=self.hidden_size, intermediate=self.intermediate_size, layers=self.num_hidden_layers,
            heads=self.num_attention_heads, kv_heads=self.kv_heads, head_dim=self.head_size, vocab=self.vocab_size,
            tied=self.tie_word_embeddings, qkv_bias=self.qkv_bias, o_bias=self.o_bias, mlp_bias=self.mlp_bias)

    @property
    def rope(self) -> dict[str, Any]:
        """RoPE parameters in the transformers-5 shape, whichever spelling the config used."""
        params = dict(self.rope_parameters or self.rope_scaling or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        return params

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence token ids as a list."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def config_path(path: Path) -> Path:
    """The config.json for `path`, which names either the file or a model directory."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def load_config(path: Path) -> ModelConfig:
    """Read and check config.json (the file or its model directory); ModelConfigError says what is wrong."""
    file = config_path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{file}: no such file (config.json does not exist: is the model directory right?)") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelConfigError(f"{file}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if "text_config" in raw and "vocab_size" not in raw and isinstance(raw["text_config"], dict):
        raw = {**raw["text_config"], "model_type": raw["text_config"].get("model_type", raw.get("model_type"))}
    _check_supported(raw, file)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ModelConfigError(f"{file}: {field}: {first['msg']}") from None
    problem = config_problem(config)
    if problem:
        raise ModelConfigError(f"{file}: {problem}")
    return config


def _check_supported(raw: dict[str, Any], file: Path) -> None:
    model_type = str(raw.get("model_type", ""))
    architectures = [str(a) for a in raw.get("architectures") or []]
    if model_type in SUPPORTED_MODEL_TYPES and all(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return
    named = ", ".join(architectures) or "none listed"
    supported = ", ".join(f"{family} (model_type {key})" for key, family in SUPPORTED_MODEL_TYPES.items())
    raise ModelConfigError(
        f"{file}: unsupported architecture {named} (model_type {model_type or 'missing'!r}); "
        f"supported: {supported}, SmolLM (model_type llama)"
    )


def config_problem(config: ModelConfig) -> str | None:
    """Why the runtime cannot build this decoder, or None."""
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} is not supported (SwiGLU needs 'silu')"
    if config.use_sliding_window:
        return "sliding-window attention is not supported"
    if config.rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        return f"rope type {config.rope['rope_type']!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
    if config.num_attention_heads % config.kv_heads:
        return (f"num_attention_heads={config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={config.kv_heads}")
    return None


def parameter_count(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                    vocab: int, tied: bool, qkv_bias: bool = False, o_bias: bool = False,
                    mlp_bias: bool = False) -> int:
    """Parameters of the decoder: embeddings, every layer's attention, MLP and two norms, the final
    norm, and the LM head unless it is tied to the embedding (then counted once)."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attention += (q_out + 2 * kv_out if qkv_bias else 0) + (hidden if o_bias else 0)
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if mlp_bias else 0)
    per_layer = attention + mlp + 2 * hidden
    embedding = vocab * hidden
    return embedding + layers * per_layer + hidden + (0 if tied else vocab * hidden)


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads one TP rank holds: its share, or one replicated head when tp exceeds the KV heads."""
    return kv_heads // tp if kv_heads % tp == 0 else 1


def tensor_problem(*, heads: int, kv_heads: int, intermediate: int, tp: int, engine: str = "native",
                   quantization: str = "none", head_dim: int | None = None, hidden: int | None = None,
                   block: int | None = None) -> str | None:
    """Why `tp` cannot shard this model on `engine` with `quantization`, or None.

    Both engines split attention heads and the MLP's inner dimension evenly. The native engine also
    runs more ranks than KV heads when tp is a multiple of them (each rank keeps a copy of the KV head
    its query heads use); DeepSpeed's AutoTP needs tp to divide the KV heads.

    Blocked quantizations (q4, gguf: `block` weights of a row per block, quantization_block's default)
    need every row to be whole blocks (hiddenSize and the row-parallel inputs) and each TP rank's slice
    of o_proj's input (heads x head_dim / tp) and down_proj's input (intermediateSize / tp) to be
    whole blocks; int8's per-output-channel scales have no block. head_dim and hidden are required then.
    """
    if engine not in ENGINES:
        return f"engine {engine!r} is unknown; engines: {', '.join(ENGINES)}"
    problem = quantization_problem(quantization=quantization, engine=engine)
    if problem:
        return problem
    if tp < 1:
        return f"tensor={tp} must be at least 1"
    if heads % tp:
        return f"tensor={tp} does not divide numAttentionHeads={heads}"
    if kv_heads % tp and (engine != "native" or tp % kv_heads):
        rule = ("" if engine != "native" else
                " (the native engine replicates KV heads only when tensor is a multiple of them)")
        return f"tensor={tp} does not divide numKeyValueHeads={kv_heads}{rule}"
    if intermediate % tp:
        return f"tensor={tp} does not divide intermediateSize={intermediate}"
    size = block or quantization_block(quantization)
    if size > 1:
        if head_dim is None or hidden is None:
            raise ValueError(f"tensor_problem: quantization={quantization} needs head_dim and hidden")
        rows = {"hiddenSize": hidden, "numAttentionHeads x headDim": heads * head_dim,
                "intermediateSize": intermediate}
        for name, width in rows.items():
            if width % size:
                return (f"{name}={width} is not a multiple of the {quantization} block of {size} weights "
                        "(every quantized row is whole blocks)")
        for linear, width in (("o_proj", heads * head_dim), ("down_proj", intermediate)):
            if width // tp % size:
                return (f"tensor={tp} splits a {quantization} block of {size} weights: {linear}'s input "
                        f"{width} / tensor={tp} = {width // tp} is not a multiple of {size}")
    return None


def pipeline_problem(*, layers: int, pp: int, engine: str = "native") -> str | None:
    """Why `pp` stages cannot run this model on `engine`, or None."""
    if pp < 1:
        return f"pipeline={pp} must be at least 1"
    if pp > layers:
        return f"pipeline={pp} exceeds numHiddenLayers={layers} (every stage needs a layer)"
    if engine == "deepspeed" and pp != 1:
        return f"pipeline={pp} with engine=deepspeed: DeepSpeed runs tensor parallel only (pipeline must be 1)"
    return None


def valid_tensor_sizes(*, heads: int, kv_heads: int, intermediate: int, limit: int,
                       engine: str = "native", quantization: str = "none", head_dim: int | None = None,
                       hidden: int | None = None, block: int | None = None) -> list[int]:
    """Every tp in 1..limit with no tensor_problem."""
    return [tp for tp in range(1, limit + 1)
            if tensor_problem(heads=heads, kv_heads=kv_heads, intermediate=intermediate, tp=tp, engine=engine,
                              quantization=quantization, head_dim=head_dim, hidden=hidden, block=block) is None]


# --- Quantized weights (issue 19) -----------------------------------------------------------------
#
# Only the linear weights of attention (q, k, v, o) and the MLP (gate, up, down) are quantized; the
# embedding, the LM head, the norms and every bias stay in the model dtype (as in the checkpoints vLLM
# serves; llama.cpp files often quantize those too, so gguf counts the file's own tensor bytes).
# Blocked formats group QUANT_BLOCK consecutive weights of one row (the input dimension), so a
# column-parallel split (output rows) never cuts a block and a row-parallel split (o_proj, down_proj:
# the input dimension) must land on a block boundary.

QUANT_BLOCK = 32  # weights per q4 (GGUF Q4_1) block, and per Q4_0/Q5_x/Q8_0 block
Q4_BLOCK_BYTES = 20  # Q4_1: fp16 scale + fp16 offset + 32 x 4 bits
Q8_0_BLOCK_BYTES = 34  # Q8_0: fp16 scale + 32 x 8 bits
# ggml tensor types a GGUF may hold: id -> (name, weights per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}
# Tensor-name suffixes of the quantized linears in a GGUF ("blk.N.attn_q.weight") and which of them
# a row-parallel TP split cuts along the input dimension.
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def is_gguf_uri(uri: str) -> bool:
    """A model source that is one GGUF file (the URI ends in .gguf or .GGUF; the CRD's CEL rule says the same),
    not a Hugging Face directory."""
    return uri.endswith((".gguf", ".GGUF"))


def quantization_problem(*, quantization: str, engine: str = "native", gguf_source: bool | None = None) -> str | None:
    """Why `quantization` cannot run on `engine` from this source, or None (gguf_source None: not known)."""
    if quantization not in QUANTIZATIONS:
        return f"quantization {quantization!r} is unknown; quantizations: {', '.join(QUANTIZATIONS)}"
    if quantization != "none" and engine == "deepspeed":
        return (f"quantization={quantization} with engine=deepspeed: DeepSpeed AutoTP shards the transformers "
                "model in the model dtype and has no quantized kernels here; use engine=native")
    if quantization == "gguf" and gguf_source is False:
        return "quantization=gguf serves a GGUF file's own tensors: model.uri must name a .gguf file"
    return None


def quantization_block(quantization: str, gguf_block: int | None = None) -> int:
    """Weights per quantization block along a row: 1 (no block: none, int8 per output channel), 32 (q4),
    or the GGUF file's largest linear block (32 for Q4_x/Q5_x/Q8_0, 256 for K-quants; 32 when unread)."""
    if quantization == "q4":
        return QUANT_BLOCK
    if quantization == "gguf":
        return gguf_block or QUANT_BLOCK
    return 1


def linear_shapes(*, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple[int, int]]:
    """(out_features, in_features) of one layer's quantizable linears: q, k, v, o, gate, up, down."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    return [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out),
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def linear_bytes(quantization: str, rows: int, cols: int, dtype_bytes: int) -> float:
    """Bytes of one (rows x cols) linear weight, scales included.

    none: dtype; int8: 1 byte a weight + one dtype scale per output row; q4 (Q4_1): 20 bytes per 32
    weights (0.625 B/weight, fp16 scale and offset); gguf without a readable file: Q8_0's 34 per 32
    (1.0625 B/weight, the largest of the common 4- to 8-bit block formats)."""
    if quantization == "none":
        return float(rows * cols * dtype_bytes)
    if quantization == "int8":
        return float(rows * cols + rows * dtype_bytes)
    blocks = rows * -(-cols // QUANT_BLOCK)
    return float(blocks * (Q4_BLOCK_BYTES if quantization == "q4" else Q8_0_BLOCK_BYTES))


def weight_bytes(*, parameters: float, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, dtype_bytes: int, quantization: str = "none", gguf_bytes: float | None = None) -> float:
    """All weight bytes of the model as served: the quantized linears plus everything else in the dtype.

    `parameters` is the whole count (tied embeddings once); what the linears do not account for
    (embedding, head, norms, biases) stays in the dtype. gguf with `gguf_bytes` (the file's tensor
    bytes, read from its header) is exactly that."""
    if quantization == "gguf" and gguf_bytes is not None:
        return float(gguf_bytes)
    shapes = linear_shapes(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim)
    linear_params = layers * sum(r * c for r, c in shapes)
    quantized = layers * sum(linear_bytes(quantization, r, c, dtype_bytes) for r, c in shapes)
    return max(0.0, parameters - linear_params) * dtype_bytes + quantized


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as a GGUF header declares it (shape in ggml order: the row length first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int = 0  # of its data, from the start of the file's data section (GGUFHeader.data_offset)

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def block(self) -> int:
        return GGML_TYPES[self.ggml_type][1]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return self.elements // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (scalars; arrays by their length) and tensor table, read without the data."""

    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[GGUFTensor, ...]
    data_offset: int = 0  # file offset of the data section: the header's end, aligned to general.alignment

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every tensor as stored: what the runtime holds when it serves the file as it is."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def linear_block(self) -> int:
        """The largest block of the linear weights' types (1 when they are unquantized)."""
        blocks = [t.block for t in self.tensors if len(t.name.split(".")) > 2 and t.name.split(".")[-2] in GGUF_LINEARS]
        return max(blocks, default=1)

    def config(self) -> ModelConfig:
        """The decoder the file describes, as a config.json would (llama architecture only)."""
        meta = self.metadata
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ModelConfigError(f"GGUF architecture {arch!r} is not supported (only llama: Llama, SmolLM, Mistral)")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"llama.{name}", default)
            if value is None:
                raise ModelConfigError(f"GGUF lacks llama.{name}")
            return value

        heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
        names = {t.name for t in self.tensors}
        vocab = meta.get("llama.vocab_size") or self.array_lengths.get("tokenizer.ggml.tokens")
        if not vocab:
            raise ModelConfigError("GGUF lacks llama.vocab_size and tokenizer.ggml.tokens")
        return ModelConfig(
            architectures=["LlamaForCausalLM"], vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")), num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads, num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("rope.dimension_count", hidden // heads)),
            tie_word_embeddings="output.weight" not in names)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF (v2/v3) header: metadata and tensor table, not the tensor data; ModelConfigError says why not."""
    import struct

    def read(handle: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = handle.read(size)
        if len(raw) != size:
            raise ModelConfigError(f"{path}: GGUF header ends early")
        return struct.unpack(fmt, raw)[0]

    def string(handle: Any) -> str:
        length = read(handle, "<Q")
        return handle.read(length).decode("utf-8", errors="replace")

    def skip(handle: Any, kind: int) -> None:
        if kind == _GGUF_STRING:
            handle.seek(read(handle, "<Q"), 1)
        elif kind == _GGUF_ARRAY:
            inner, count = read(handle, "<I"), read(handle, "<Q")
            for _ in range(count):
                skip(handle, inner)
        elif kind in _GGUF_SCALARS:
            handle.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
        else:
            raise ModelConfigError(f"{path}: unknown GGUF value type {kind}")

    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ModelConfigError(f"{path}: not a GGUF file (no GGUF magic)")
            version = read(handle, "<I")
            if version not in (2, 3):
                raise ModelConfigError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            tensor_count, kv_count = read(handle, "<Q"), read(handle, "<Q")
            metadata: dict[str, Any] = {}
            arrays: dict[str, int] = {}
            for _ in range(kv_count):
                name, kind = string(handle), read(handle, "<I")
                if kind == _GGUF_STRING:
                    metadata[name] = string(handle)
                elif kind == _GGUF_ARRAY:
                    inner, count = read(handle, "<I"), read(handle, "<Q")
                    arrays[name] = count
                    for _ in range(count):
                        skip(handle, inner)
                elif kind in _GGUF_SCALARS:
                    metadata[name] = read(handle, _GGUF_SCALARS[kind])
                else:
                    raise ModelConfigError(f"{path}: unknown GGUF value type {kind} for {name}")
            tensors = []
            for _ in range(tensor_count):
                name, dims = string(handle), read(handle, "<I")
                shape = tuple(read(handle, "<Q") for _ in range(dims))
                ggml_type, offset = read(handle, "<I"), read(handle, "<Q")
                if ggml_type not in GGML_TYPES:
                    raise ModelConfigError(f"{path}: tensor {name} has ggml type {ggml_type}, which the planner "
                                           "does not know")
                tensors.append(GGUFTensor(name, shape, ggml_type, offset))
            alignment = int(metadata.get("general.alignment", 32) or 32)
            data_offset = -(-handle.tell() // alignment) * alignment
    except OSError as err:
        raise ModelConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    return GGUFHeader(metadata, arrays, tuple(tensors), data_offset)
