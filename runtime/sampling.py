"""Next-token choice on the last pipeline stage: greedy, temperature, top-k, top-p, seeded per slot."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the smallest top-p nucleus, as transformers does."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is <= 1 - top_p; the most likely token always stays.
        drop = cumulative <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Per-slot random generators: a slot's stream restarts with its seed when a sequence starts."""

    def __init__(self, max_batch: int) -> None:
        self.generators = [torch.Generator() for _ in range(max_batch)]

    def reset(self, slot: int, seed: int | None) -> None:
        """Start a new sequence in `slot`: seeded if asked, otherwise from the OS entropy pool."""
        self.generators[slot].manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def sample(self, logits: Tensor, slots: list[int], temperature: list[float], top_k: list[int],
               top_p: list[float]) -> list[int]:
        """One token per row of `logits` [B, vocab] (float32, on any device)."""
        greedy = logits.argmax(-1).tolist()
        out = []
        for row, slot in enumerate(slots):
            if temperature[row] <= 0.0:
                out.append(int(greedy[row]))
                continue
            scaled = filter_logits(logits[row].float().cpu() / temperature[row], top_k[row], top_p[row])
            probs = scaled.softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=self.generators[slot])))
        return out
