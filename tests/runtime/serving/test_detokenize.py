"""Streaming text pieces add up to the full decode, and stop strings never leak into a stream."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from largemodel.runtime.detokenize import IncrementalDetokenizer, find_stop, stop_prefix_holdback


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_pieces_concatenate_to_the_full_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    prompt = tokenizer("def main(argv):", add_special_tokens=False)["input_ids"]
    for _ in range(50):
        # Random ids include lone UTF-8 continuation bytes and special tokens: the hard cases.
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        pieces = [detok.add(t) for t in ids] + [detok.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_character_is_held_until_complete(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("é€ ok", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "é€ ok"


def test_find_stop_and_holdback() -> None:
    assert find_stop("hello world", ("wor", "lo"), 0) == 3
    assert find_stop("hello world", ("xyz",), 0) is None
    # A match straddling what was already searched is still found.
    assert find_stop("abcSTOP", ("STOP",), 5) == 3
    assert stop_prefix_holdback("the end is ne", ("near",)) == 2
    assert stop_prefix_holdback("the end", ("near",)) == 0
    assert stop_prefix_holdback("x</s", ("</s>", "s>")) == 3
