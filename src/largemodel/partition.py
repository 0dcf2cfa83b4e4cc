"""The one layer split used by the planner and by the runtime's pipeline stages."""

from __future__ import annotations


def split_layers(num_layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible; earlier stages take the remainder.

    Earlier stages get the extra layers because the last stage also carries the final norm
    and the LM head, so this keeps the per-stage work closest to even.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if num_layers < stages:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
    base, extra = divmod(num_layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def stage_layer_range(num_layers: int, stages: int, stage: int) -> range:
    """Global indices of the layers that `stage` owns."""
    counts = split_layers(num_layers, stages)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])
