"""Turn a Llama-family GGUF into a Hugging Face model directory with the `gguf` package alone.

llama.cpp's files carry the weights (often quantised), the shapes and the tokenizer as metadata. The
engine loads Hugging Face directories (config.json, *.safetensors, tokenizer.json), so a local run
converts a GGUF once: every tensor is dequantised to fp32 (`gguf.quants.dequantize`), renamed to
the transformers Llama names, and q/k get back the head layout llama.cpp's converter permuted away;
the tokenizer (byte-level BPE, vocabulary, merges, control tokens, chat template) is rebuilt with the
`tokenizers` library. No torch, no accelerate, no transformers: the result equals what transformers'
own GGUF loader produces from the same file, which tests/runtime/test_modelstore.py checks tensor by
tensor and token by token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str, int, int], None]

# llama.cpp tensor names (after "blk.N.") -> transformers' Llama module names (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>
_USER_DEFINED = 4


class GGUFConvertError(ValueError):
    """The GGUF describes something this converter cannot turn into a Llama directory; says what."""


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field of the file, arrays as lists, strings decoded."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM the file describes."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConvertError(f"GGUF architecture {arch!r} is not supported (only llama: Llama, SmolLM, Mistral)")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise GGUFConvertError(f"GGUF lacks llama.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("rope.dimension_count", hidden // heads))
    vocab = int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "dtype": "float32",
    }
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            config[f"{hf_key}_token_id"] = int(token_id)
    return config


def hf_name(gguf_name: str) -> str:
    """transformers' parameter name for a llama.cpp tensor name."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise GGUFConvertError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


_GGUF_LAYER_NAMES = {hf: gguf for gguf, hf in _LAYER_NAMES.items()}
_GGUF_TOP_NAMES = {hf: gguf for gguf, hf in _TOP_NAMES.items()}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a transformers Llama parameter name (hf_name's inverse)."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _GGUF_LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_GGUF_LAYER_NAMES[parts[3]]}.{suffix}"
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
    raise GGUFConvertError(f"parameter {name!r} has no GGUF counterpart")


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: it interleaves each head's two rotary halves; HF keeps them apart."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantized(tensor: Any) -> np.ndarray:
    """The tensor as fp32 in transformers' [out, in] order (GGUF lists dimensions innermost first)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(int(tensor.tensor_type))
    data = np.asarray(tensor.data) if kind == GGMLQuantizationType.F32 else dequantize(tensor.data, kind)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)


def tokenizer_files(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config) for the byte-level BPE the file describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConvertError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    alphabet = set(_byte_alphabet().values())
    spelling = _byte_alphabet()
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens stay whole and special; a "control" token spelled outside the byte alphabet is a
    # llama.cpp mislabel that would grow the vocabulary, and is left alone (as transformers does).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED and t in vocab])

    def token(name: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[int(token_id)] if token_id is not None else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return tok, config


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def convert(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> None:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files into `out_dir`."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    report = progress or (lambda step, done, total: None)
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    config = write_model_files(meta, {t.name for t in reader.tensors}, out_dir, with_config=False)
    report("tokenizer", 1, 1)

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, start=1):
        name = hf_name(tensor.name)
        array = dequantized(tensor)
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute(array, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute(array, kv_heads)
        weights[name] = array
        if done == total or done % max(1, total // 4) == 0:
            report("dequantise", done, total)
    missing = [f"model.layers.{i}.{m}.weight" for i in range(config["num_hidden_layers"])
               for m in _LAYER_NAMES.values() if f"model.layers.{i}.{m}.weight" not in weights]
    if missing:
        raise GGUFConvertError(f"GGUF lacks {len(missing)} layer tensors, e.g. {missing[0]}")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_config(config, out_dir)
    report("weights", total, total)


def write_model_files(meta: dict[str, Any], tensor_names: set[str], out_dir: Path,
                      with_config: bool = True) -> dict[str, Any]:
    """The tokenizer files (and, with `with_config`, config.json and generation_config.json) of a
    Hugging Face directory for the file `meta` describes; returns the config. `convert` writes the
    config after the weights (a directory with a config.json is a model); quantization=gguf serves
    a directory holding only these files and the GGUF itself (runtime/modelstore.gguf_model_dir)."""
    config = hf_config(meta, tied="output.weight" not in tensor_names)
    tok, tok_config = tokenizer_files(meta)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    if with_config:
        write_config(config, out_dir)
    return config


def write_config(config: dict[str, Any], out_dir: Path) -> None:
    """config.json and generation_config.json (bos/eos/pad) of `config`."""
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
