"""Attention masks as rules over positions, so any backend can build just the tile it needs.

An `AttentionMask` says which key each query may see. It is a rule, not a T×T tensor: the dense
backends ask for the whole matrix, the blockwise (FlashAttention-style) backend asks tile by tile and
skips tiles where nothing is visible. Rules compose: causal, sliding window, always-visible prefix
tokens (attention sinks / Longformer globals), sparse patterns (Longformer, BigBird, dilated),
document boundaries of packed sequences, and key padding.

Usage:
    m = AttentionMask(q_pos=torch.arange(8), k_pos=torch.arange(8), causal=True, window=4)
    m.dense()                      # (1, 1, 8, 8) bool, True = visible
    m.block(slice(0, 4), slice(4, 8))   # one tile; None means "everything visible"
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMask:
    q_pos: torch.Tensor
    """(Tq,) positions of the queries, in the frame the keys use."""
    k_pos: torch.Tensor
    """(Tk,) positions of the keys."""
    causal: bool = True
    window: int = 0
    """A query sees keys with q - k < window (itself included); |q - k| < window when bidirectional. 0 = off."""
    n_global: int = 0
    """Keys at positions < n_global are visible to every query (sinks, Longformer/BigBird globals)."""
    global_queries: bool = False
    """Longformer/BigBird: queries at positions < n_global also see every key."""
    dilation: int = 1
    """Dilated window: only offsets that are multiples of `dilation`, up to window*dilation."""
    random_blocks: int = 0
    """BigBird: each query block also sees this many random key blocks."""
    block_size: int = 64
    """Block size of BigBird's block-level rules."""
    seed: int = 0
    doc_q: torch.Tensor | None = None
    """(B, Tq) document id of each query; keys of other documents are hidden (packed sequences)."""
    doc_k: torch.Tensor | None = None
    """(B, Tk) document id of each key; a negative id marks a key every document sees (prefix tuning's
    virtual tokens)."""
    key_padding: torch.Tensor | None = None
    """(B, Tk) True for real keys, False for padding."""
    prefix_len: torch.Tensor | None = None
    """(B,) prefix-LM: keys at positions < prefix_len[b] are visible to every query of row b, so the
    prefix attends bidirectionally while the rest stays causal."""
    _random_cache: dict = field(default_factory=dict, repr=False)

    # ---- cheap facts that let backends take fast paths
    @property
    def has_batch_rules(self) -> bool:
        return self.doc_q is not None or self.key_padding is not None or self.prefix_len is not None

    def is_plain_causal(self) -> bool:
        """Exactly the standard causal square (SDPA's is_causal=True)."""
        return (self.causal and not self.window and not self.random_blocks and not self.n_global
                and not self.has_batch_rules and self.q_pos.shape[0] == self.k_pos.shape[0]
                and bool(self.q_pos[0] == self.k_pos[0]))

    def is_full(self) -> bool:
        """Every query sees every key (e.g. one decode step without a window)."""
        if self.window or self.random_blocks or self.has_batch_rules:
            return False
        return not self.causal or bool(self.q_pos.min() >= self.k_pos.max())

    def tile_state(self, q_sl: slice, k_sl: slice) -> str:
        """'empty', 'full' or 'partial' for a tile, from position ranges alone when that settles it.

        Positions are increasing, so a tile's extreme offsets are its corners. This lets the blockwise
        backend skip hidden tiles and unmask full ones without building their (tq, tk) masks."""
        if self.has_batch_rules:
            return "partial"
        q, k = self.q_pos[q_sl], self.k_pos[k_sl]
        q_lo, q_hi, k_lo, k_hi = int(q[0]), int(q[-1]), int(k[0]), int(k[-1])
        rescued = self.random_blocks or (self.n_global and (k_lo < self.n_global or
                                                            (self.global_queries and q_lo < self.n_global)))
        if self.causal and k_lo > q_hi:
            return "empty"
        reach = self.window * self.dilation
        if self.window and not rescued:
            far = q_lo - k_hi if self.causal else max(q_lo - k_hi, k_lo - q_hi)
            if far >= reach:
                return "empty"
        causal_ok = not self.causal or k_hi <= q_lo
        window_ok = not self.window or (self.dilation == 1 and max(q_hi - k_lo, k_hi - q_lo if not self.causal else 0) < reach)
        return "full" if causal_ok and window_ok else "partial"

    # ---- the rule
    def block(self, q_sl: slice = slice(None), k_sl: slice = slice(None)) -> torch.Tensor | None:
        """Visibility of the tile q_pos[q_sl] × k_pos[k_sl] as a (1 or B, 1, tq, tk) bool tensor."""
        q = self.q_pos[q_sl][:, None]
        k = self.k_pos[k_sl][None, :]
        diff = q - k
        allowed = diff >= 0 if self.causal else torch.ones_like(diff, dtype=torch.bool)
        if self.window:
            dist = diff if self.causal else diff.abs()
            local = dist < self.window * self.dilation
            if self.dilation > 1:
                local &= dist % self.dilation == 0
            if self.random_blocks:
                local |= self._random_visible(q[:, 0], k[0])
            if self.n_global:
                local |= k < self.n_global
                if self.global_queries:
                    local |= q < self.n_global
            allowed &= local
        allowed = allowed[None, None]
        if self.prefix_len is not None:
            in_prefix = k[None] < self.prefix_len[:, None, None]  # (B, 1, tk)
            allowed = allowed | in_prefix[:, None]
        if self.doc_q is not None:
            doc_k = self.doc_k[:, None, k_sl]
            same_doc = (self.doc_q[:, q_sl, None] == doc_k) | (doc_k < 0)
            allowed = allowed & same_doc[:, None]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, None, k_sl]
        return allowed

    def dense(self) -> torch.Tensor:
        return self.block()

    def _random_visible(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """BigBird's random blocks: a fixed pseudo-random set of key blocks per query block."""
        bs = self.block_size
        qb, kb = q // bs, k // bs
        n_kblocks = int(self.k_pos.max()) // bs + 1
        out = torch.zeros(len(q), len(k), dtype=torch.bool)
        for b in qb.unique().tolist():
            chosen = self._random_cache.get(b)
            if chosen is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
                limit = b + 1 if self.causal else n_kblocks  # causal: only blocks at or before the query's
                chosen = torch.randperm(limit, generator=g)[: self.random_blocks]
                self._random_cache[b] = chosen
            rows = qb == b
            out[rows] = torch.isin(kb, chosen)[None, :].expand(int(rows.sum()), -1)
        return out


def mask_for(cfg, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, *, n_sink: int = 0,
             doc_q: torch.Tensor | None = None, doc_k: torch.Tensor | None = None,
             key_padding: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None) -> AttentionMask:
    """The mask a model config asks for at one layer (window = that layer's sliding window)."""
    pattern = cfg.sparse_pattern
    kw = dict(q_pos=q_pos, k_pos=k_pos, causal=cfg.causal, window=window, doc_q=doc_q, doc_k=doc_k,
              key_padding=key_padding, prefix_len=prefix_len, block_size=cfg.attn_block_size, n_global=n_sink)
    if pattern == "longformer":
        kw.update(n_global=max(n_sink, cfg.sparse_global_tokens), global_queries=True)
    elif pattern == "bigbird":
        # BigBird: three-block sliding window, global blocks, and random blocks, all at block granularity.
        kw.update(window=window or 2 * cfg.attn_block_size, n_global=max(n_sink, cfg.sparse_global_tokens),
                  global_queries=True, random_blocks=cfg.sparse_random_blocks)
    elif pattern == "dilated":
        kw.update(dilation=cfg.sparse_dilation)
    return AttentionMask(**kw)
