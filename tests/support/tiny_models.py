"""Tiny seeded random checkpoints saved by transformers, and their reference generations.

Two kinds: the parallel-world VARIANTS (word-level tokenizer, reference generations from
transformers) and `build_tiny_llama`, a Llama with a real (small, trained-here) BPE tokenizer and
chat template for the serving, image and live-deployment tests. No network: the BPE tokenizer is
trained with `tokenizers` on text that ships with Python. torch and transformers are imported
where they are used, so the packaging tests that import this module do not load them.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 9, 2)
# What each world runs per model: greedy for the transformers comparison, seeded sampling for
# "same seed, same tokens on every split".
SAMPLINGS = {
    "greedy": {"params": {}, "new_tokens": NEW_TOKENS},
    "seeded": {"params": {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 1234}, "new_tokens": 8},
}


@dataclass(frozen=True)
class TinyModel:
    """One model variant: what it exercises, its config, and where it was saved."""

    name: str
    family: str  # "llama" or "qwen2"
    config: dict[str, Any]

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def valid_tp(self, tp: int) -> bool:
        """The engine's own rule (heads split, KV heads split or replicate), plus intermediate % tp."""
        heads, kv = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        return heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and self.config["intermediate_size"] % tp == 0

    def valid(self, tp: int, pp: int) -> bool:
        return self.valid_tp(tp) and pp <= self.layers


VARIANTS = [
    # GQA, 4 query heads per KV head, untied.
    TinyModel("gqa", "llama", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)),
    # MQA: one KV head, replicated on every TP rank; 5 layers (no pp > 1 divides it); llama3 RoPE scaling.
    TinyModel("mqa", "llama", dict(vocab_size=200, hidden_size=96, intermediate_size=192, num_hidden_layers=5,
                                   num_attention_heads=12, num_key_value_heads=1, tie_word_embeddings=False,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                   rope_theta=500000.0)),
    # Tied embeddings and a prime vocab (padded for every tp > 1).
    TinyModel("tied", "llama", dict(vocab_size=131, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    # Qwen2: q/k/v bias, 3 KV heads (tp=3), 3 layers.
    TinyModel("qwen2", "qwen2", dict(vocab_size=151, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False)),
]


def prompts(seed: int = 7) -> list[list[int]]:
    """Prompts of different lengths, valid for every variant's vocab."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = min(int(v.config["vocab_size"]) for v in VARIANTS)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def build_checkpoint(variant: TinyModel, directory: Path, seed: int = 0) -> Path:
    """Save a seeded random model of `variant` to `directory` with safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.08, eos_token_id=2,
                  bos_token_id=1)
    if variant.family == "qwen2":
        model: Any = Qwen2ForCausalLM(Qwen2Config(**common, **variant.config))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, **variant.config))
    model.to(torch.float32).save_pretrained(directory)
    return directory


def reference(directory: Path, prompt_list: list[list[int]]) -> dict[str, Any]:
    """transformers' greedy continuation (NEW_TOKENS, no early stop) and last-position logits per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logits = [], []
    with torch.inference_mode():
        for prompt in prompt_list:
            ids = torch.tensor([prompt])
            logits.append(model(ids).logits[0, -1].float().tolist())
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            tokens.append(out[0, len(prompt):].tolist())
    return {"tokens": tokens, "logits": logits}


def build_all(root: Path) -> dict[str, dict[str, Any]]:
    """Every variant saved under `root`, with its reference; also written to root/reference.json."""
    prompt_list = prompts()
    table = {}
    for variant in VARIANTS:
        directory = build_checkpoint(variant, root / variant.name)
        save_word_tokenizer(directory, int(variant.config["vocab_size"]))
        table[variant.name] = {"dir": str(directory), **reference(directory, prompt_list)}
    (root / "reference.json").write_text(json.dumps({"prompts": prompt_list, "models": table}))
    return table


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token i is the word `word(i)`: enough for the HTTP server to run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=word(2), unk_token=word(0),
                            pad_token=word(0)).save_pretrained(directory)


def word(token: int) -> str:
    """Fixed width, so no word is a prefix of another (special tokens match inside words)."""
    return f"w{token:04d}"


# --- A tiny Llama with a trained BPE tokenizer and a chat template ------------------------------

# ChatML, as SmolLM2 and Qwen use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    import argparse
    import json as json_mod
    import logging
    import textwrap

    text = "\n".join(inspect.getsource(m) for m in (argparse, json_mod, logging, textwrap))
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_tiny_llama(out: Path, layers: int = 4, seed: int = 0) -> Path:
    """Seeded random Llama (GQA, tied embeddings) + tokenizer + greedy generation_config in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger weights than the default init give peaked, well-separated logits: greedy choices are
    # then decided by the model, not by float rounding, so batching must not change them.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": config.eos_token_id}))
    return out
