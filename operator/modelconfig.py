"""Model knowledge from a Hugging Face config.json: the `architecture` block the planner needs.

Only the Llama family is supported (Llama 2/3, Mistral, Qwen2, SmolLM): the runtime implements
exactly that decoder, so anything else is rejected here, before a planner or a pod ever sees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from largemodel import modelfacts
from largemodel.operator.api import Architecture

# model_type -> the family name users know; SmolLM ships as model_type "llama".
SUPPORTED_MODEL_TYPES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class ModelConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model the runtime cannot run."""


class HFConfig(BaseModel):
    """The fields of a Hugging Face config.json that shape the weights (the rest is ignored)."""

    model_config = ConfigDict(extra="ignore")

    model_type: str = ""
    architectures: list[str] = Field(default_factory=list)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    num_hidden_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    head_dim: int | None = Field(default=None, ge=1)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


def config_path(path: Path) -> Path:
    """The config.json for `path`, which names either the file or a model directory."""
    return path / "config.json" if path.is_dir() else path


def load_config(path: Path) -> HFConfig:
    """Read and validate config.json (file or model directory); ModelConfigError says what is wrong."""
    file = config_path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelConfigError(f"{file}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    _check_supported(raw, file)
    try:
        return HFConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ModelConfigError(f"{file}: {field}: {first['msg']}") from None


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


def parameter_count(cfg: HFConfig) -> int:
    """Parameters computed from the tensor shapes; tied embeddings are counted once."""
    heads = cfg.num_attention_heads
    # Qwen2 always has q/k/v biases (o has none); attention_bias adds q/k/v and o biases.
    return modelfacts.parameter_count(
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers, heads=heads,
        kv_heads=cfg.num_key_value_heads or heads, head_dim=cfg.head_dim or cfg.hidden_size // heads,
        vocab=cfg.vocab_size, tied=cfg.tie_word_embeddings, qkv_bias=cfg.attention_bias or cfg.model_type == "qwen2",
        o_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def architecture_from_config(cfg: HFConfig) -> Architecture:
    """The spec.model.architecture block for a validated config."""
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or heads
    if heads % kv_heads:
        raise ModelConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = cfg.head_dim if cfg.head_dim and cfg.head_dim != cfg.hidden_size // heads else None
    return Architecture(
        numAttentionHeads=heads,
        numKeyValueHeads=kv_heads,
        numHiddenLayers=cfg.num_hidden_layers,
        hiddenSize=cfg.hidden_size,
        intermediateSize=cfg.intermediate_size,
        vocabSize=cfg.vocab_size,
        parameters=float(parameter_count(cfg)),
        headDim=head_dim,
        tieWordEmbeddings=cfg.tie_word_embeddings,
    )


def inspect_model(path: Path) -> Architecture:
    """`largemodel inspect PATH`: config.json (file or directory) -> architecture block."""
    return architecture_from_config(load_config(path))
