"""The one layer split used by the planner and by the runtime's pipeline stages.

Decode reads every weight of a stage once per step, so a stage's time follows its weight bytes.
The last stage also reads the LM head (vocab x hidden; 1-3 layers' worth for today's Llama-family
models), which an even split of the layers ignores: with pp=2 on a 32-layer 8B model the last stage
would read 15% more than the first, and the pipeline runs at the pace of its slowest stage. The
split therefore counts the head as `head_layers` extra layers on the last stage and balances.
"""

from __future__ import annotations


def lm_head_layers(hidden_size: int, intermediate_size: int, vocab_size: int, heads: int, kv_heads: int,
                   head_dim: int) -> float:
    """The LM head's weight in decoder layers: vocab x hidden over one layer's attention + MLP weights."""
    attention = hidden_size * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v
    mlp = 3 * hidden_size * intermediate_size  # gate, up, down
    return vocab_size * hidden_size / (attention + mlp)


def split_layers(num_layers: int, stages: int, head_layers: float = 0.0) -> list[int]:
    """Layers per stage, every stage at least one, minimizing the largest stage's weight (layers, plus
    `head_layers` on the last stage). Ties go to earlier stages, which take the remainder of an even
    split: the last stage also carries the final norm and the LM head.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
    if head_layers < 0:
        raise ValueError(f"head_layers must be >= 0, got {head_layers}")
    base, extra = divmod(num_layers, stages)
    counts = [base + (1 if i < extra else 0) for i in range(stages)]

    def load(i: int) -> float:
        return counts[i] + (head_layers if i == stages - 1 else 0.0)

    # Move layers off the last stage, one at a time to the lightest (earliest) stage, while that
    # lowers the heavier of the two. Each move lowers the last stage's load: at most num_layers moves.
    while stages > 1 and counts[-1] > 1:
        lightest = min(range(stages - 1), key=lambda i: (load(i), i))
        if not load(lightest) + 1 < load(stages - 1):
            break
        counts[lightest] += 1
        counts[-1] -= 1
    return counts


def stage_layer_range(num_layers: int, stages: int, stage: int, head_layers: float = 0.0) -> range:
    """Global indices of the layers that `stage` owns."""
    counts = split_layers(num_layers, stages, head_layers)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])
