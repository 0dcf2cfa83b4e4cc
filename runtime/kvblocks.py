"""The paged KV cache's block tables and prefix cache, kept on global rank 0 (vLLM's block manager, small).

Every rank's cache is `num_blocks` blocks of `block_size` token positions per layer; a sequence's
positions 0, 1, ... live in the blocks its table lists, in order. The table of each row travels in
the micro-batch plan (pipeline.py), so every TP rank and pipeline stage writes and reads the same
blocks, and only this object decides which.

Prefix reuse: a block that holds `block_size` known tokens gets a key, the hash chain of its tokens
and every token before it (blake2b over the parent block's key and its own token ids), and is kept
in `cached` under that key. A new sequence whose prompt starts with the tokens of cached blocks takes
those blocks into its table (reference counted) and its prefill starts after them. Only full blocks
are shared, and a sequence only ever writes at positions past what it shares, so a shared block is
never written again (no copy-on-write). The last prompt token is always computed (its logits pick the
first new token), so a hit covers at most len(prompt) - 1 tokens.

Blocks whose count drops to 0 stay cached (least recently used first out) until a new block is needed:
first never-used or uncached blocks are taken, then the least recently used cached one is evicted.
The cache has at least `max_batch x blocks_per_seq` blocks, so a running sequence always gets its
next block: no preemption.

Ordering: every stage runs micro-batches in the order stage 0 submitted them, so a block registered
when its filling micro-batch is planned is written on every rank before any later micro-batch reads it.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

UNKNOWN = -1  # a position whose token this manager was not told (a caller writing at arbitrary positions)


class BlockError(ValueError):
    """A request the block tables cannot take (positions past the limit, rewinding over shared blocks)."""


@dataclass
class SeqBlocks:
    """One slot's sequence: its block table and the tokens at its positions."""

    table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # chain key of each full block of known tokens, in order


class BlockManager:
    """Block tables of the engine's slots, with prefix reuse when `prefix_cache`."""

    def __init__(self, num_blocks: int, block_size: int, max_batch: int, blocks_per_seq: int,
                 prefix_cache: bool = True) -> None:
        if num_blocks < max_batch * blocks_per_seq:
            raise ValueError(f"{num_blocks} blocks cannot hold {max_batch} sequences of {blocks_per_seq} blocks")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_batch, self.blocks_per_seq = max_batch, blocks_per_seq
        self.prefix_cache = prefix_cache
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}  # block -> its chain key, for cached (registered) blocks
        self.cached: dict[bytes, int] = {}  # chain key -> block
        self.free: collections.deque[int] = collections.deque(range(num_blocks))  # never used or uncached
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs 0, cached; LRU first
        self.seqs: dict[int, SeqBlocks] = {}
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up / found cached, since start

    # ---- what the engine asks ------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        """Blocks some running sequence holds (the KV cache's utilization numerator)."""
        return self.num_blocks - len(self.free) - len(self.evictable)

    def start(self, slot: int, prompt: list[int]) -> int:
        """A new sequence in `slot` (whatever was there is released): take the cached blocks its prompt
        starts with; returns how many prompt tokens they hold (its prefill starts there)."""
        self.release(slot)
        seq = self.seqs[slot] = SeqBlocks()
        if not self.prefix_cache or len(prompt) < 2:
            return 0
        for key, block in self._cached_chain(prompt):
            self._take(block)
            seq.table.append(block)
            seq.keys.append(key)
        hit = len(seq.table) * self.block_size
        seq.tokens = list(prompt[:hit])
        self.queried_tokens += len(prompt)
        self.hit_tokens += hit
        return hit

    def extend(self, slot: int, start_pos: int, tokens: list[int]) -> list[int]:
        """`tokens` go to positions start_pos.. of `slot`'s sequence: give it blocks to hold them, note the
        tokens, cache the blocks they fill; returns the slot's block table covering every position so far.

        start_pos 0 on a slot that has a sequence starts a new one (without prefix reuse; `start` does that).
        """
        seq = self.seqs.get(slot)
        if seq is None or (start_pos == 0 and seq.tokens):
            self.release(slot)
            seq = self.seqs[slot] = SeqBlocks()
        end = start_pos + len(tokens)
        if end > self.blocks_per_seq * self.block_size:
            raise BlockError(f"slot {slot}: position {end - 1} past the {self.blocks_per_seq * self.block_size} "
                             "a sequence may hold")
        if start_pos < len(seq.tokens):
            self._rewind(slot, seq, start_pos)
        seq.tokens += [UNKNOWN] * (start_pos - len(seq.tokens)) + list(tokens)
        while len(seq.table) * self.block_size < end:
            seq.table.append(self._allocate())
        self._register(seq)
        return list(seq.table)

    def release(self, slot: int) -> None:
        """The sequence in `slot` is done: its blocks lose a reference (cached ones stay for reuse)."""
        seq = self.seqs.pop(slot, None)
        if seq is None:
            return
        for block in seq.table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def peek(self, prompt: list[int]) -> int:
        """How many prompt tokens `start` would find cached now (counts nothing, takes nothing)."""
        if not self.prefix_cache:
            return 0
        return sum(self.block_size for _ in self._cached_chain(prompt))

    # ---- inside ----------------------------------------------------------------------------------

    def _cached_chain(self, prompt: list[int]) -> Iterator[tuple[bytes, int]]:
        """(key, block) of each cached full block the prompt starts with, in order; never its last token."""
        key = b""
        for i in range((len(prompt) - 1) // self.block_size):
            key = self._key(key, prompt[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(key)
            if block is None:
                return
            yield key, block

    @staticmethod
    def _key(parent: bytes, tokens: list[int]) -> bytes:
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens))
        return digest.digest()

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently released
            del self.cached[self.key_of.pop(block)]
        else:  # cannot happen: num_blocks >= max_batch x blocks_per_seq (checked at start)
            raise BlockError("no free KV-cache block")
        self.refs[block] = 1
        return block

    def _register(self, seq: SeqBlocks) -> None:
        """Give every newly full block of known tokens its chain key, and cache it under that key."""
        if not self.prefix_cache:
            return
        size = self.block_size
        while len(seq.keys) < len(seq.tokens) // size:
            i = len(seq.keys)
            chunk = seq.tokens[i * size:(i + 1) * size]
            if UNKNOWN in chunk:
                return  # nothing after an unknown token can be matched
            key = self._key(seq.keys[-1] if seq.keys else b"", chunk)
            seq.keys.append(key)
            block = seq.table[i]
            if key not in self.cached and block not in self.key_of:
                self.cached[key], self.key_of[block] = block, key

    def _rewind(self, slot: int, seq: SeqBlocks, start_pos: int) -> None:
        """The caller rewrites positions from start_pos on: blocks from there on must be its own."""
        first = start_pos // self.block_size
        for i in range(first, len(seq.table)):
            block = seq.table[i]
            if self.refs[block] > 1:
                raise BlockError(f"slot {slot}: position {start_pos} rewrites a block other sequences share")
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.cached[key]
        del seq.keys[first:]
        del seq.tokens[start_pos:]
