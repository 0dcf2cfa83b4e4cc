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
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def tensor_problem(*, heads: int, kv_heads: int, intermediate: int, tp: int, engine: str = "native") -> str | None:
    """Why `tp` cannot shard this model on `engine`, or None.

    Both engines split attention heads and the MLP's inner dimension evenly. The native engine also
    runs more ranks than KV heads when tp is a multiple of them (each rank keeps a copy of the KV head
    its query heads use); DeepSpeed's AutoTP needs tp to divide the KV heads.
    """
    if engine not in ENGINES:
        return f"engine {engine!r} is unknown; engines: {', '.join(ENGINES)}"
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
                       engine: str = "native") -> list[int]:
    """Every tp in 1..limit with no tensor_problem."""
    return [tp for tp in range(1, limit + 1)
            if tensor_problem(heads=heads, kv_heads=kv_heads, intermediate=intermediate, tp=tp, engine=engine) is None]
