"""The Engine as the scheduler uses it, in one process (tp=1, pp=1): inputs, sampling, slots, shutdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from largemodel.runtime.engine import (
    Engine,
    EngineError,
    SamplingParams,
    SeqInput,
    micro_batch_count,
    padding_groups,
    split_micro_batches,
)
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage


@pytest.fixture
def engine(checkpoints: dict[str, Any]) -> Engine:
    model, _ = build_stage(Path(checkpoints["models"]["gqa"]["dir"]), ParallelContext(), torch.float32,
                           torch.device("cpu"), 4, 64)
    return Engine(model, ParallelContext(), micro_batches=2, min_micro_batch_tokens=1)


def generate(engine: Engine, prompt: list[int], n: int, sampling: SamplingParams, slot: int = 0) -> list[int]:
    out = engine.step([SeqInput(slot, prompt, 0, sampling)])
    while len(out) < n:
        out += engine.step([SeqInput(slot, [out[-1]], len(prompt) + len(out) - 1, sampling)])
    return out


def test_interface_attributes(engine: Engine) -> None:
    assert (engine.max_batch_size, engine.max_model_len, engine.vocab_size, engine.micro_batches) == (4, 64, 256, 2)
    assert engine.eos_token_ids == [2]


@pytest.mark.parametrize(("batch", "message"), [
    ([], "batch is empty"),
    ([SeqInput(4, [1], 0)], "slot 4 is outside 0..3"),
    ([SeqInput(0, [1], 0), SeqInput(0, [2], 0)], "slot 0 appears twice"),
    ([SeqInput(0, [], 0)], "no tokens"),
    ([SeqInput(0, [1, 2], 63)], "exceed max_model_len=64"),
    ([SeqInput(0, [1, 999], 0)], r"token ids \[999\] outside the vocabulary"),
    ([SeqInput(0, [1], 0, SamplingParams(top_p=0.0))], "0 < top_p <= 1"),
    ([SeqInput(0, [1], 0, SamplingParams(temperature=-1))], "temperature >= 0"),
])
def test_bad_inputs_are_engine_errors(engine: Engine, batch: list[SeqInput], message: str) -> None:
    with pytest.raises(EngineError, match=message):
        engine.step(batch)


def test_sampling_is_seeded_per_slot_and_top_k_1_is_greedy(engine: Engine, checkpoints: dict[str, Any]) -> None:
    prompt = checkpoints["prompts"][0]
    greedy = checkpoints["models"]["gqa"]["tokens"][0][:12]
    assert generate(engine, prompt, 12, SamplingParams(temperature=1.5, top_k=1, seed=3)) == greedy
    hot = SamplingParams(temperature=1.5, seed=11)
    first = generate(engine, prompt, 12, hot)
    assert generate(engine, prompt, 12, hot, slot=2) == first  # same seed, another slot: same stream
    assert generate(engine, prompt, 12, SamplingParams(temperature=1.5, seed=12)) != first
    assert first != greedy


def test_a_reused_slot_starts_fresh(engine: Engine, checkpoints: dict[str, Any]) -> None:
    """start_pos 0 in a slot that held a longer sequence: nothing of the old one leaks in."""
    long_prompt, short_prompt = checkpoints["prompts"][1], checkpoints["prompts"][2]
    generate(engine, long_prompt, 20, SamplingParams())
    assert generate(engine, short_prompt, 32, SamplingParams()) == checkpoints["models"]["gqa"]["tokens"][2]


def test_submit_and_result_keep_groups_in_flight(engine: Engine, checkpoints: dict[str, Any]) -> None:
    """Two independent groups through submit/result give what step gives."""
    prompts, want = checkpoints["prompts"], checkpoints["models"]["gqa"]["tokens"]
    tickets = [engine.submit([SeqInput(0, prompts[0], 0)]), engine.submit([SeqInput(1, prompts[1], 0)])]
    assert [engine.result(t) for t in reversed(tickets)] == [[want[1][0]], [want[0][0]]]


def test_shutdown_is_idempotent_and_final(engine: Engine) -> None:
    engine.shutdown()
    engine.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        engine.step([SeqInput(0, [1], 0)])


def test_small_decode_steps_are_not_split(checkpoints: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting a decode step only multiplies weight reads: steps split only when micro-batches stay big."""
    from largemodel.runtime import engine as engine_module

    model, _ = build_stage(Path(checkpoints["models"]["gqa"]["dir"]), ParallelContext(), torch.float32,
                           torch.device("cpu"), 4, 64)
    eng = Engine(model, ParallelContext(), micro_batches=2, min_micro_batch_tokens=8)
    seen: list[int] = []
    real = engine_module.split_micro_batches
    monkeypatch.setattr(engine_module, "split_micro_batches", lambda b, m: seen.append(m) or real(b, m))
    eng.step([SeqInput(0, [5] * 9, 0), SeqInput(1, [6] * 9, 0)])  # 18 prompt tokens: 2 micro-batches
    eng.step([SeqInput(0, [7], 9), SeqInput(1, [8], 9)])  # 2 decode tokens: 1
    assert seen == [2, 1]


def test_micro_batch_split_is_contiguous_and_even() -> None:
    batch = [SeqInput(i, [1], 0) for i in range(7)]
    chunks = split_micro_batches(batch, 3)
    assert [[s.slot for s in c] for c in chunks] == [[0, 1, 2], [3, 4], [5, 6]]
    assert len(split_micro_batches(batch[:1], 4)) == 1


def test_micro_batch_count_keeps_min_tokens_in_each() -> None:
    """The one split rule (Engine.step and the scheduler's lanes): at most M, each with >= min tokens, >= 1."""
    assert [micro_batch_count(n, 4, 8) for n in (0, 1, 7, 8, 15, 16, 24, 32, 1000)] == [1, 1, 1, 1, 1, 2, 3, 4, 4]
    assert micro_batch_count(5, 1, 1) == 1 and micro_batch_count(5, 8, 1) == 5


def test_padding_groups_keep_a_long_prefill_apart_from_decodes() -> None:
    rows = [SeqInput(0, [1], 9), SeqInput(1, list(range(3, 43)), 0), SeqInput(2, [1], 9), SeqInput(3, [5] * 38, 0)]
    assert padding_groups(rows) == [[1, 3], [0, 2]]  # 40 and 38 tokens together, the two decodes apart
    assert padding_groups(rows[:1] + rows[2:3]) == [[0, 1]]
    small = [SeqInput(0, [1] * 20, 0), SeqInput(1, [1], 20)]  # pads 19 tokens: cheaper than a weight pass
    assert padding_groups(small) == [[0, 1]]


def test_a_batch_split_by_padding_returns_its_tokens_in_input_order(engine: Engine) -> None:
    """Two decodes beside a 40-token prefill go as two micro-batches; each row gets the token it would
    get alone, in the order it was given."""
    greedy = SamplingParams()
    long_prompt = [(7 * i) % 200 + 3 for i in range(40)]
    alone = [generate(engine, [5, 6, 7], 2, greedy, slot=0), generate(engine, [9, 8], 2, greedy, slot=1),
             generate(engine, long_prompt, 1, greedy, slot=2)]
    first = engine.step([SeqInput(0, [5, 6, 7], 0, greedy), SeqInput(1, [9, 8], 0, greedy)])
    mixed = [SeqInput(0, [first[0]], 3, greedy), SeqInput(2, long_prompt, 0, greedy), SeqInput(1, [first[1]], 2, greedy)]
    assert len(padding_groups(mixed)) == 2
    assert engine.result(engine.submit(mixed)) == [alone[0][1], alone[2][0], alone[1][1]]
