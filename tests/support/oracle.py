"""What transformers itself generates on the test checkpoint: the reference the server must match."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any


@cache
def load(model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model) from `model_dir`, loaded once per test process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def chat_ids(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids the chat template gives `messages` (with the assistant turn opened)."""
    tokenizer, _ = load(model_dir)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(model_dir: Path, text: str) -> list[int]:
    """Prompt token ids of a plain completion prompt."""
    tokenizer, _ = load(model_dir)
    return list(tokenizer(text)["input_ids"])


def greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of exactly `new_tokens` tokens (EOS does not stop it)."""
    import torch

    _, model = load(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt_ids):]]


def decode(model_dir: Path, ids: list[int]) -> str:
    """Text of `ids` as the server streams it (special tokens skipped)."""
    tokenizer, _ = load(model_dir)
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
