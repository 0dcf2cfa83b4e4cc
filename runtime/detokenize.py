"""Incremental detokenization and stop strings for streaming: text per token, never a broken character.

Decoding a token on its own loses what depends on its neighbours (SentencePiece's leading
space, a UTF-8 character split over several byte tokens), so each step decodes a short window
of the recent tokens and emits only what the newest token added once it forms whole characters.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context, so the first generated token decodes as it would mid-text.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """The part of a transformers tokenizer detokenizing uses."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool,
               clean_up_tokenization_spaces: bool) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces whose concatenation is the full text."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_tokens[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def add(self, token: int) -> str:
        """Text that `token` completes; "" while it ends in an unfinished multi-byte character."""
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end), as decoded."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]


def find_stop(text: str, stops: tuple[str, ...], searched: int) -> int | None:
    """Index where the earliest stop string starts in `text`, or None.

    `searched` is how much of `text` earlier calls already searched: only a match that ends
    after it can be new, so the search starts one stop-length before it.
    """
    if not stops:
        return None
    start = max(0, searched - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (not streamed yet)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
