"""The block manager: which KV-cache blocks each sequence owns, with reference counts and a prefix cache.

The KV pool (paged_attention.PagedKVCache) is cut into `num_blocks` blocks of `block_size` token slots.
A sequence's block table lists its blocks in order, so token position p lives in slot
block_table[p // block_size] * block_size + p % block_size (PagedAttention, Kwon et al. 2023).

- Reference counts let sequences share blocks: n > 1 samples and beam hypotheses fork their parent's
  table (ref += 1) and copy a shared block only when they are about to write into it (copy-on-write).
- Prefix caching: once a block is full and its K/V computed, it is registered under a chained hash,
  hash(parent block's hash, its tokens, adapter). A new sequence walks its prompt block by block and
  reuses every block whose hash is cached, checking that the block's tokens and parent hash really
  match (a hash collision can never reuse wrong K/V). Blocks are registered only after their K/V was
  written, so a hit never reads a block still being filled.
- Freed blocks keep their contents and hash: they sit in an LRU free queue and can be revived by a
  later hit until a fresh allocation evicts them (oldest first; blocks without a hash go first).

Usage:
    bm = BlockManager(num_blocks=64, block_size=16)
    cached = bm.allocate_prefix(seq)          # prefix-cache hits, in tokens
    copies = bm.ensure_slots(seq, seq.num_tokens)   # None when the pool is full; else CoW (src, dst) pairs
    bm.register_computed(seq); bm.free(seq)
"""
from __future__ import annotations

from collections import OrderedDict

from lmstack.errors import LmstackError
from lmstack.infer.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "tokens", "parent_hash")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None
        self.parent_hash: int | None = None


def root_hash(lora: str | None) -> int:
    """The chain's start: different adapters produce different K/V, so they never share blocks."""
    return hash(("lmstack-prefix", lora))


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise LmstackError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.hit_tokens = 0  # prompt tokens served from the prefix cache, in total
        self.queried_tokens = 0

    # ---- facts
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- low level
    def _take(self) -> int:
        """A fresh block: the least recently freed one, evicting its prefix-cache entry."""
        bid, _ = self.free_queue.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None:
            if self.cached.get(b.hash) == bid:
                del self.cached[b.hash]
            b.hash = b.tokens = b.parent_hash = None
        b.ref_count = 1
        return bid

    def _release(self, bid: int) -> None:
        b = self.blocks[bid]
        b.ref_count -= 1
        if b.ref_count < 0:
            raise LmstackError(f"block {bid} released more often than it was taken")
        if b.ref_count == 0:
            self.free_queue[bid] = None
            if b.hash is None:  # nothing worth keeping: reuse it first
                self.free_queue.move_to_end(bid, last=False)

    # ---- sequences
    def allocate_prefix(self, seq: Sequence) -> int:
        """Take prefix-cache hits for a sequence that holds no blocks yet; returns the cached token count.

        At least one token is always left to compute, because the last prompt position's logits are needed."""
        if seq.block_table:
            raise LmstackError(f"sequence {seq.seq_id} already holds blocks")
        seq.block_hashes, seq.hashed_blocks = [], 0
        if not self.enable_prefix_caching or seq.request.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need the logits of every prompt position, so nothing is skipped
        bs = self.block_size
        n_full = (seq.num_tokens - 1) // bs
        self.queried_tokens += seq.num_tokens
        parent = root_hash(seq.request.lora)
        for i in range(n_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            bid = self.cached.get(h)
            if bid is None:
                break
            b = self.blocks[bid]
            if b.tokens != tokens or b.parent_hash != parent:  # verify: never trust the hash alone
                break
            if b.ref_count == 0:
                del self.free_queue[bid]
            b.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
            parent = h
        seq.hashed_blocks = len(seq.block_table)
        cached = len(seq.block_table) * bs
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        self.hit_tokens += cached
        return cached

    def ensure_slots(self, seq: Sequence, upto: int) -> list[tuple[int, int]] | None:
        """Make positions [num_computed_tokens, upto) writable: allocate missing blocks and copy shared ones.

        Returns the (src, dst) block copies the KV pool must do, or None (changing nothing) when the
        pool has too few free blocks."""
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        last = self.blocks_for(upto)
        shared = [i for i in range(first, min(last, len(seq.block_table)))
                  if self.blocks[seq.block_table[i]].ref_count > 1]
        need = max(0, last - len(seq.block_table)) + len(shared)
        if need > self.num_free_blocks:
            return None
        copies = []
        for i in shared:  # copy-on-write
            src = seq.block_table[i]
            dst = self._take()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        while len(seq.block_table) < last:
            seq.block_table.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        child.block_table = list(parent.block_table)
        for bid in child.block_table:
            self.blocks[bid].ref_count += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Last blocks first, so a prompt's early (most shareable) blocks
        are the last to be evicted."""
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.block_hashes, seq.hashed_blocks = [], 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release blocks past what num_tokens positions need (after rejected speculative tokens)."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def register_computed(self, seq: Sequence) -> None:
        """Put the sequence's newly full and computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq.request.lora)
        for i in range(len(seq.block_hashes), n_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            b = self.blocks[seq.block_table[i]]
            if b.hash is None:
                b.hash, b.tokens, b.parent_hash = h, tokens, parent
                self.cached.setdefault(h, b.id)
            seq.block_hashes.append(h)
            parent = h
        seq.hashed_blocks = len(seq.block_hashes)

    def check_consistency(self) -> None:
        """Raise if reference counts and the free queue disagree (used by tests)."""
        for b in self.blocks:
            if (b.ref_count == 0) != (b.id in self.free_queue):
                raise LmstackError(f"block {b.id}: ref_count={b.ref_count} but in free queue={b.id in self.free_queue}")
