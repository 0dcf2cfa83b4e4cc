"""A tiny seeded random Llama checkpoint with a small BPE tokenizer, built offline in seconds."""

from __future__ import annotations

import inspect
from pathlib import Path

LAYERS = 5  # odd, so pp=2 splits it unevenly (3 + 2) and per-stage counts differ


def _corpus() -> list[str]:
    import json
    import logging

    text = "\n".join(inspect.getsource(module) for module in (json, logging))
    return [line for line in text.splitlines() if line.strip()]


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Save a random Llama (GQA, tied embeddings, 5 layers, tp<=2-friendly) and its tokenizer to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=301, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out
