"""The layer split shared by the planner and the runtime's pipeline stages."""

from __future__ import annotations

import itertools

import pytest

from largemodel.partition import lm_head_layers, split_layers, stage_layer_range


def test_even_split_without_a_head_gives_the_remainder_to_early_stages() -> None:
    assert split_layers(80, 2) == [40, 40]
    assert split_layers(7, 3) == [3, 2, 2]
    assert split_layers(5, 5) == [1] * 5


@pytest.mark.parametrize(("layers", "stages"), [(16, 2), (16, 4), (30, 2), (80, 3), (7, 3), (4, 4), (126, 8)])
@pytest.mark.parametrize("head", [0.0, 0.4, 1.23, 2.9, 8.0, 40.0])
def test_split_minimizes_the_heaviest_stage(layers: int, stages: int, head: float) -> None:
    """Against every split into `stages` non-empty stages: none has a lighter heaviest stage."""
    got = split_layers(layers, stages, head)
    assert sum(got) == layers and len(got) == stages and min(got) >= 1

    def heaviest(counts: tuple[int, ...] | list[int]) -> float:
        return max(*counts[:-1], counts[-1] + head) if len(counts) > 1 else counts[0] + head

    if layers <= 30:  # exhaustive check where the number of splits is small
        splits = [c for c in itertools.product(range(1, layers + 1), repeat=stages) if sum(c) == layers]
        assert heaviest(got) == pytest.approx(min(heaviest(c) for c in splits))
    else:  # moving one layer off the heaviest stage to any other never helps
        worst = heaviest(got)
        for src, dst in itertools.permutations(range(stages), 2):
            moved = list(got)
            moved[src] -= 1
            moved[dst] += 1
            if moved[src] >= 1:
                assert heaviest(moved) >= worst - 1e-9


def test_ranges_tile_the_layers() -> None:
    head = lm_head_layers(1024, 2816, 32000, 16, 4, 64)
    assert head == pytest.approx(2.907, abs=1e-3)
    ranges = [stage_layer_range(16, 2, s, head) for s in range(2)]
    assert ranges == [range(0, 9), range(9, 16)]
    assert list(itertools.chain(*[stage_layer_range(30, 4, s, 8.0) for s in range(4)])) == list(range(30))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="stages must be >= 1"):
        split_layers(4, 0)
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match="head_layers must be >= 0"):
        split_layers(4, 2, -1.0)
