"""runtime/kvblocks.py as a unit: block allocation, prefix reuse, reference counts, LRU eviction."""

from __future__ import annotations

import pytest

from largemodel.runtime.kvblocks import BlockError, BlockManager

BS = 4  # tokens per block in these tests


def manager(max_batch: int = 2, blocks_per_seq: int = 4, extra: int = 0, prefix_cache: bool = True) -> BlockManager:
    return BlockManager(max_batch * blocks_per_seq + extra, BS, max_batch, blocks_per_seq, prefix_cache)


def run_prompt(m: BlockManager, slot: int, prompt: list[int]) -> tuple[int, list[int]]:
    """What the engine does for a new request: start, then the prefill after the cached part."""
    hit = m.start(slot, prompt)
    return hit, m.extend(slot, hit, prompt[hit:])


def test_blocks_are_allocated_as_a_sequence_grows() -> None:
    m = manager()
    assert m.extend(0, 0, [1, 2, 3]) == [0]
    assert m.extend(0, 3, [4]) == [0]  # the block is full now, no new one yet
    assert m.extend(0, 4, [5]) == [0, 1]
    assert m.used_blocks == 2
    with pytest.raises(BlockError, match="position 16 past the 16"):
        m.extend(0, 5, list(range(12)))


def test_a_second_prompt_reuses_the_full_blocks_of_a_cached_prefix() -> None:
    m = manager(max_batch=3)
    shared = [9, 8, 7, 6, 5, 4, 3, 2, 1]  # two full blocks, then one token into the third
    hit, first = run_prompt(m, 0, shared + [10, 11])
    assert hit == 0 and len(first) == 3
    hit, second = run_prompt(m, 1, shared + [20, 21, 22])
    assert hit == 8 and second[:2] == first[:2] and second[2] != first[2]  # only full blocks are shared
    assert m.refs[first[0]] == m.refs[first[1]] == 2
    assert (m.queried_tokens, m.hit_tokens) == (11 + 12, 8)
    # the last prompt token is always computed: a prompt that is exactly the cached blocks hits one block less
    assert run_prompt(m, 2, shared[:8])[0] == 4


def test_the_hash_chain_matches_a_block_only_after_the_same_tokens() -> None:
    """Block 1 of [a, b] is not block 1 of [c, b]: its key includes every token before it."""
    m = manager()
    run_prompt(m, 0, [1, 1, 1, 1, 2, 2, 2, 2, 3])
    assert m.peek([5, 5, 5, 5, 2, 2, 2, 2, 3]) == 0
    assert m.peek([1, 1, 1, 1, 2, 2, 2, 2, 9]) == 8
    assert m.peek([1, 1, 1, 1, 2, 2, 2, 9, 9]) == 4


def test_released_blocks_stay_cached_until_evicted_least_recently_used_first() -> None:
    m = manager(max_batch=1, blocks_per_seq=2, extra=1)  # 3 blocks
    run_prompt(m, 0, [1, 1, 1, 1, 7])  # block 0 cached (full), block 1 partial
    m.release(0)
    assert m.used_blocks == 0 and m.peek([1, 1, 1, 1, 0]) == 4  # still cached after release
    run_prompt(m, 0, [2, 2, 2, 2, 7])  # takes the uncached blocks first: block 0 survives
    m.release(0)
    assert m.peek([1, 1, 1, 1, 0]) == 4 and m.peek([2, 2, 2, 2, 0]) == 4
    run_prompt(m, 0, [3, 3, 3, 3, 3, 3, 3, 3])  # needs two new blocks: evicts the least recently released
    assert m.peek([1, 1, 1, 1, 0]) == 0, "the older cached prefix goes first"
    assert m.peek([2, 2, 2, 2, 0]) == 4


def test_a_block_in_use_is_never_evicted() -> None:
    m = manager(max_batch=2, blocks_per_seq=2)  # exactly enough for two full sequences
    hit, table = run_prompt(m, 0, [1, 1, 1, 1, 2])
    for slot_prompt in ([5, 5, 5, 5, 5, 5, 5, 5],) * 3:  # slot 1 churns through every other block
        m.release(1)
        run_prompt(m, 1, slot_prompt)
    assert m.seqs[0].table == table and m.refs[table[0]] == 1
    assert m.peek([1, 1, 1, 1, 9]) == 4


def test_starting_a_slot_again_releases_what_it_held() -> None:
    m = manager()
    _, table = run_prompt(m, 0, [1, 2, 3, 4, 5])
    run_prompt(m, 0, [6, 7])
    assert m.refs[table[1]] == 0 and table[1] in m.free  # the partial block went back
    assert m.refs[table[0]] == 0 and table[0] in m.evictable  # the full one stays cached
    m.extend(0, 0, [8])  # position 0 on a busy slot starts a new sequence too
    assert len(m.seqs[0].tokens) == 1


def test_no_reuse_when_the_prefix_cache_is_off() -> None:
    m = manager(prefix_cache=False)
    run_prompt(m, 0, [1] * 9)
    assert run_prompt(m, 1, [1] * 9)[0] == 0 and not m.cached


def test_rewinding_over_a_shared_block_is_refused_and_an_own_block_is_uncached() -> None:
    m = manager()
    run_prompt(m, 0, [1, 1, 1, 1, 2, 2, 2, 2, 3])
    hit, _ = run_prompt(m, 1, [1, 1, 1, 1, 2, 2, 2, 2, 4])
    assert hit == 8
    with pytest.raises(BlockError, match="other sequences share"):
        m.extend(1, 2, [9])
    m.release(1)
    m.extend(0, 6, [9, 9, 9])  # slot 0 alone holds its blocks: block 1 is rewritten, so it leaves the cache
    assert m.peek([1, 1, 1, 1, 2, 2, 2, 2, 0]) == 4
    assert m.peek([1, 1, 1, 1, 2, 2, 9, 9, 0]) == 8  # and the rewritten block is cached under its new tokens


def test_positions_written_without_their_tokens_are_never_matched() -> None:
    m = manager()
    m.extend(0, 4, [1, 1, 1, 1])  # positions 0-3 unknown
    assert m.peek([0, 0, 0, 0, 1, 1, 1, 1, 1]) == 0 and not m.cached


def test_too_few_blocks_for_the_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold 2 sequences"):
        BlockManager(7, BS, 2, 4)
