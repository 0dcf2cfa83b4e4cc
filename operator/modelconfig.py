"""`largemodel inspect`: the `architecture` block the planner needs, from a Hugging Face config.json.

Reading and checking the config is `largemodel.modelfacts` (shared with the runtime, so what inspect
accepts is exactly what a pod can build); this module only turns it into the API's block.
"""

from __future__ import annotations

from pathlib import Path

from largemodel.modelfacts import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    ModelConfigError,
    config_path,
    load_config,
)
from largemodel.operator.api import Architecture

# The name the operator half has always used for the parsed config.
HFConfig = ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "HFConfig", "ModelConfigError", "architecture_from_config",
           "config_path", "inspect_model", "load_config", "parameter_count"]


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters computed from the tensor shapes (biases included); tied embeddings are counted once."""
    return cfg.parameters


def architecture_from_config(cfg: ModelConfig) -> Architecture:
    """The spec.model.architecture block for a validated config."""
    heads = cfg.num_attention_heads
    head_dim = cfg.head_dim if cfg.head_dim and cfg.head_dim != cfg.hidden_size // heads else None
    return Architecture(
        numAttentionHeads=heads,
        numKeyValueHeads=cfg.kv_heads,
        numHiddenLayers=cfg.num_hidden_layers,
        hiddenSize=cfg.hidden_size,
        intermediateSize=cfg.intermediate_size,
        vocabSize=cfg.vocab_size,
        parameters=float(cfg.parameters),
        headDim=head_dim,
        tieWordEmbeddings=cfg.tie_word_embeddings,
    )


def inspect_model(path: Path) -> Architecture:
    """`largemodel inspect PATH`: config.json (file or directory) -> architecture block."""
    return architecture_from_config(load_config(path))
