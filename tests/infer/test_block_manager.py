"""Block manager: reference counts, copy-on-write, chained prefix hashes verified on hit, LRU reuse."""
import pytest

from lmstack.errors import LmstackError
from lmstack.infer import SamplingParams
from lmstack.infer import block_manager as bmod
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import Request


def seq_of(tokens, lora=None):
    return Request("r", None, tokens, SamplingParams(), lora=lora).seqs[0]


def computed(bm, seq):
    assert bm.ensure_slots(seq, seq.num_tokens) is not None
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def test_allocation_and_free_restore_the_pool():
    bm = BlockManager(8, 4)
    s = seq_of(list(range(10)))
    assert bm.allocate_prefix(s) == 0
    assert bm.ensure_slots(s, 10) == []
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.ensure_slots(s, 100) is None and len(s.block_table) == 3  # too big: nothing changes
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    bm.check_consistency()


def test_prefix_hits_are_chained_and_leave_one_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq_of(list(range(12)))
    bm.allocate_prefix(a)
    computed(bm, a)
    b = seq_of(list(range(12)))
    assert bm.allocate_prefix(b) == 8  # 3 full blocks cached, but the last prompt token must be computed
    assert b.block_table == a.block_table[:2] and bm.blocks[a.block_table[0]].ref_count == 2
    c = seq_of([99] + list(range(1, 12)))  # first block differs: the chain breaks at once
    assert bm.allocate_prefix(c) == 0
    d = seq_of(list(range(8)) + [7, 7, 7, 7, 1])
    assert bm.allocate_prefix(d) == 8
    assert bm.allocate_prefix(seq_of(list(range(12)), lora="x")) == 0  # adapters never share K/V


def test_hash_collisions_are_caught_by_token_verification(monkeypatch):
    monkeypatch.setattr(bmod, "block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(16, 4)
    a = seq_of([1, 2, 3, 4, 5])
    bm.allocate_prefix(a)
    computed(bm, a)
    b = seq_of([9, 9, 9, 9, 5])
    assert bm.allocate_prefix(b) == 0  # same hash, different tokens: not a hit
    c = seq_of([1, 2, 3, 4, 6])
    assert bm.allocate_prefix(c) == 4


def test_freed_blocks_stay_cached_until_lru_eviction():
    bm = BlockManager(4, 2)
    a = seq_of([1, 2, 3, 4, 5])
    bm.allocate_prefix(a)
    computed(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq_of([1, 2, 3, 4, 5])
    assert bm.allocate_prefix(b) == 4  # revived from the free queue
    bm.free(b)
    filler = seq_of([7] * 8)
    bm.allocate_prefix(filler)
    bm.ensure_slots(filler, 8)  # takes every block: the cached ones are evicted
    bm.free(filler)
    assert bm.allocate_prefix(seq_of([1, 2, 3, 4, 5])) == 0


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, 2)
    a = seq_of([1, 2, 3])
    bm.allocate_prefix(a)
    computed(bm, a)  # block 0 cached (full), block 1 partial (no hash)
    bm.free(a)
    b = seq_of([8])
    bm.allocate_prefix(b)
    bm.ensure_slots(b, 1)
    assert b.block_table[0] != a_first_block(bm)


def a_first_block(bm):
    return next(b.id for b in bm.blocks if b.hash is not None)


def test_fork_and_copy_on_write():
    bm = BlockManager(8, 4)
    parent = seq_of([1, 2, 3, 4, 5, 6])
    bm.allocate_prefix(parent)
    computed(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    child.token_ids.append(7)
    copies = bm.ensure_slots(child, 7)  # writes position 6, inside the shared partial block
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert bm.blocks[parent.block_table[1]].ref_count == 1
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8
    with pytest.raises(LmstackError):
        bm._release(0)
