"""Paged KV blocks: allocation, reference counts, and prefix caching by hash-chained full blocks.

Free of torch on purpose: it only hands out block ids, which the model runner turns into cache slots.

Prefix caching (vLLM's automatic prefix caching, SGLang's RadixAttention in block form): a full block
is identified by hash(parent block's hash, its own tokens), so equal hashes mean equal prefixes up to
and including that block. A block whose last user finished keeps its hash and its k/v; it sits in the
free list until it is reused, either by a request with the same prefix (a hit) or, oldest first, as a
fresh block (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llmpress.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its k/v are computed
    token_ids: tuple[int, ...] = ()  # the tokens behind the hash, to rule out hash collisions


def chained_block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class NoFreeBlocksError(RuntimeError):
    """The scheduler asked for more blocks than are free (it must check `can_allocate` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently freed first; an OrderedDict so a cache hit can take one out in O(1).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------------
    def _full_block_hashes(self, token_ids: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        hashes, parent = [], None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start:start + self.block_size])
            parent = chained_block_hash(parent, tokens)
            hashes.append((parent, tokens))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`'s tokens (full blocks only).

        At least one token is always left to compute: the step that computes it yields the logits for
        the next token, so a prompt made only of cached blocks gives its last block back.
        """
        if not self.enable_prefix_caching:
            return []
        token_ids = seq.all_token_ids
        hits = []
        for block_hash, tokens in self._full_block_hashes(token_ids):
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= len(token_ids):
            hits.pop()
        return hits

    # -- allocation -----------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Whether `seq` (holding no blocks) can get blocks for its first `num_tokens` tokens, reusing `cached_prefix`."""
        reused_free = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(num_tokens) - len(cached_prefix)
        return new + reused_free <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, cached_prefix: list[int] = ()) -> None:
        """Give `seq` blocks for its first `num_tokens` tokens: the cached prefix shared, the rest fresh."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        if not self.can_allocate(seq, num_tokens, cached_prefix):
            raise NoFreeBlocksError(f"sequence {seq.seq_id} needs more blocks than are free")
        for block_id in cached_prefix:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_registered_blocks = len(cached_prefix)
        seq.num_computed_tokens = len(cached_prefix) * self.block_size
        self.prefix_queries_tokens += len(seq.prompt_token_ids) if seq.num_preemptions == 0 else 0
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.prefix_hit_tokens += seq.num_computed_tokens
        self._grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq`'s block table can be extended to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq`'s block table to hold `num_tokens` tokens (no-op if it already does)."""
        if not self.can_grow(seq, num_tokens):
            raise NoFreeBlocksError(f"sequence {seq.seq_id} needs more blocks than are free")
        self._grow(seq, num_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_fresh())

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """The least recently freed block, its old prefix-cache entry evicted."""
        if not self.free_blocks:
            raise NoFreeBlocksError("no free KV block")
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None and self.cached_blocks.get(block.block_hash) == block_id:
            del self.cached_blocks[block.block_hash]
        block.block_hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; unreferenced blocks become free, last block first (evicted first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publish `seq`'s full, computed blocks in the prefix cache (called after each step)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:  # most decode steps fill no block
            return
        parent = self.blocks[seq.block_table[seq.num_registered_blocks - 1]].block_hash if seq.num_registered_blocks else None
        token_ids = seq.all_token_ids
        for index in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            if block.block_hash is None:
                tokens = tuple(token_ids[index * self.block_size:(index + 1) * self.block_size])
                block.block_hash, block.token_ids = chained_block_hash(parent, tokens), tokens
                # Another sequence may have computed the same prefix first; its block stays the shared one.
                self.cached_blocks.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash
        seq.num_registered_blocks = num_full

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every block is referenced exactly as often as live block tables name it, and free iff unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id}: ref {block.ref_count} != {counts[block.block_id]}"
            assert (block.ref_count == 0) == (block.block_id in self.free_blocks), f"block {block.block_id} free-list mismatch"
        for block_hash, block_id in self.cached_blocks.items():
            assert self.blocks[block_id].block_hash == block_hash, f"stale cache entry for block {block_id}"
