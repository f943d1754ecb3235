"""BlockManager invariants under random admit / grow / finish / preempt sequences, and prefix reuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from llmpress.engine.block_manager import BlockManager, NoFreeBlocksError
from llmpress.engine.sequence import Sequence
from llmpress.generation.sampling import SamplingParams


def seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", tokens, SamplingParams())


def test_full_prefix_is_shared_and_the_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(12)))
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.register_computed_blocks(a)
    b = seq(1, list(range(12)))  # the same 3 full blocks: all cached, but one token must be computed
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    c = seq(2, list(range(10)) + [99, 98, 97])  # shares the first two blocks only
    assert bm.find_cached_prefix(c) == a.block_table[:2]
    bm.allocate(c, c.num_tokens, bm.find_cached_prefix(c))
    assert c.num_computed_tokens == 8 and c.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_invariants([a, c])


def test_freed_blocks_keep_their_prefix_until_evicted_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(0, [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_computed_blocks(a)
    full_blocks = a.block_table[:2]
    bm.free(a)
    assert bm.find_cached_prefix(seq(1, [1, 2, 3, 4, 7])) == full_blocks
    # Taking every block for unrelated work evicts the cached ones; afterwards nothing hits.
    other = seq(2, list(range(100, 108)))
    bm.allocate(other, 8)
    assert bm.find_cached_prefix(seq(3, [1, 2, 3, 4, 7])) == []
    with pytest.raises(NoFreeBlocksError):
        bm.grow(other, 9)
    bm.check_invariants([other])


def test_hash_collision_is_not_a_hit():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq(0, [1, 2, 3])
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.register_computed_blocks(a)
    bm.blocks[a.block_table[0]].token_ids = (9, 9)  # as if another prefix had produced the same hash
    assert bm.find_cached_prefix(seq(1, [1, 2, 5])) == []


operations = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "preempt"]),
                                st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=operations, block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 24),
       prefix_caching=st.booleans())
def test_invariants_hold_under_random_operations(ops, block_size, num_blocks, prefix_caching):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    live: list[Sequence] = []
    next_id = 0
    shared_prefix = [7] * 6  # many prompts start alike, so prefix hits and shared blocks are common
    for op, value in ops:
        if op == "admit":
            length = 1 + value % 12
            tokens = (shared_prefix + [value % 5] * 12)[:length] if value % 2 else [value % 3] * length
            s = seq(next_id, tokens)
            next_id += 1
            cached = bm.find_cached_prefix(s)
            if bm.can_allocate(s, s.num_tokens, cached):
                bm.allocate(s, s.num_tokens, cached)
                s.num_computed_tokens = s.num_tokens
                bm.register_computed_blocks(s)
                live.append(s)
            else:
                with pytest.raises(NoFreeBlocksError):
                    bm.allocate(s, s.num_tokens, cached)
                assert s.block_table == []
        elif op == "grow" and live:
            s = live[value % len(live)]
            s.output_token_ids.append(value % 5)
            if bm.can_grow(s, s.num_tokens):
                bm.grow(s, s.num_tokens)
                s.num_computed_tokens = s.num_tokens
                bm.register_computed_blocks(s)
            else:
                s.output_token_ids.pop()
        elif op in ("finish", "preempt") and live:
            s = live.pop(value % len(live))
            bm.free(s)
            assert s.block_table == []
        bm.check_invariants(live)
        assert bm.num_free_blocks + len({b for s in live for b in s.block_table}) == num_blocks
    for s in live:
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks  # nothing leaked
