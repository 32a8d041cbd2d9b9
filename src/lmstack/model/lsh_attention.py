"""Reformer LSH attention (Kitaev et al. 2020): hash, sort into buckets, attend within chunks.

Per hash round r, a random rotation R_r (D x n_buckets/2) gives each vector the bucket
argmax([xR_r; -xR_r]) (angular LSH: nearby directions share a bucket). Queries and keys are sorted by
(bucket, position), cut into chunks of `chunk_size`, and each query chunk attends to its own key chunk
and the one before it, so the score tensor is T x 2*chunk per round instead of T x T.

Reformer details kept here:
- shared-QK: keys are the queries themselves, normalised to unit length, so a query and its key land
  in the same bucket. A token may attend to itself only when nothing else is visible (its score is
  replaced by -5e4, as in the paper).
- several hash rounds, combined by their log-sum-exp: out = sum_r softmax_r(L_r) o_r. A key that two
  rounds both bring in would count twice, so each score is lowered by log(number of rounds in which
  this query sees this key); with that, the rounds together compute softmax attention over the union
  of the keys they found, and more rounds approach full attention.
- causal masking by original position; padding to a multiple of chunk_size is masked out.
Rotations are drawn fresh each training step (the paper's hash noise) and from a fixed seed in eval,
so inference is deterministic.

Usage (selected by ModelConfig.attention = "lsh"):
    attn = LSHAttention(cfg)                   # lsh_n_hashes, lsh_chunk_size, lsh_n_buckets, lsh_shared_qk
    out = attn(q, k, v, causal=True)           # q (B, H, T, D), k (B, H or Hkv, T, D), v (B, Hkv, T, D)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SELF_SCORE = -5e4  # shared-QK: a token's own key, used only when nothing else is visible


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) gathered per round along T: idx (B, H, R, T) -> (B, H, R, T, D)."""
    r = idx.shape[2]
    src = x.unsqueeze(2).expand(-1, -1, r, -1, -1)
    return src.gather(3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1]))


def _look_back(x: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(..., n, c, X) -> (..., n, 2c, X): each chunk followed by the previous one (wrapping)."""
    if n_chunks == 1:
        return x  # the previous chunk would be the same chunk: attend once
    return torch.cat([x, x.roll(1, dims=-3)], dim=-2)


def _softmax_lse(s: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s) and logsumexp(s) along dim, with rows of all -inf giving p = 0 and L = -inf (no NaN,
    forward or backward). The max is subtracted exactly, so scores near -5e4 keep full precision."""
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m)
    total = e.sum(dim=dim, keepdim=True)
    p = e / total.clamp(min=1e-30)
    lse = torch.where(total > 0, m + torch.log(total.clamp(min=1e-30)), torch.full_like(total, float("-inf")))
    return p, lse


class LSHAttention(nn.Module):
    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        self.n_hashes = cfg.lsh_n_hashes
        self.chunk = cfg.lsh_chunk_size
        self.n_buckets = cfg.lsh_n_buckets
        self.shared_qk = cfg.lsh_shared_qk
        self.scale = cfg.head_dim ** -0.5
        self.seed = seed

    def buckets_for(self, t: int) -> int:
        """n_buckets, or about T/chunk_size (Reformer's choice) rounded to an even number >= 2."""
        if self.n_buckets:
            return self.n_buckets
        return max(2, 2 * round(t / (2 * self.chunk)))

    def _rotations(self, d: int, n_buckets: int, device, dtype) -> torch.Tensor:
        shape = (d, self.n_hashes, n_buckets // 2)
        if self.training:
            return torch.randn(shape, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def _hash(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> bucket ids (B, H, R, T)."""
        r = torch.einsum("bhtd,drk->bhrtk", x, rot)
        return torch.cat([r, -r], dim=-1).argmax(dim=-1)

    def forward(self, q, k, v, causal: bool) -> torch.Tensor:
        b, h, t, d = q.shape
        if self.shared_qk:
            k = q  # Reformer's shared-QK: one projection serves as queries and (normalised) keys
        if k.shape[1] != h:  # GQA: every query head needs its own keys for the sort
            k = k.repeat_interleave(h // k.shape[1], 1)
        if v.shape[1] != h:
            v = v.repeat_interleave(h // v.shape[1], 1)
        c = self.chunk
        tp = math.ceil(t / c) * c
        n = tp // c
        k = F.normalize(k, dim=-1)  # Reformer's shared-QK keys are unit vectors
        if tp != t:
            q, k, v = (F.pad(x, (0, 0, 0, tp - t)) for x in (q, k, v))
        pos = torch.arange(tp, device=q.device)
        n_buckets = self.buckets_for(t)
        rot = self._rotations(d, n_buckets, q.device, q.dtype)

        def order(x):
            bucket = self._hash(x, rot)
            key = bucket * tp + pos                                        # sort by bucket, then position
            key = torch.where(pos < t, key, n_buckets * tp + pos)          # padding sorts last
            return key.argsort(dim=-1)                                     # (B, H, R, Tp)

        order_q = order(q)
        order_k = order_q if self.shared_qk else order(k)
        rr = self.n_hashes
        qs = _gather_rows(q, order_q).view(b, h, rr, n, c, d)
        ks = _look_back(_gather_rows(k, order_k).view(b, h, rr, n, c, d), n)
        vs = _look_back(_gather_rows(v, order_k).view(b, h, rr, n, c, d), n)
        pq = order_q.view(b, h, rr, n, c)                                  # original positions, sorted
        pk = _look_back(order_k.view(b, h, rr, n, c, 1), n).squeeze(-1)

        acc = torch.promote_types(q.dtype, torch.float32)
        s = (qs @ ks.transpose(-1, -2)).to(acc) * self.scale              # (B, H, R, n, c, 2c or c)
        hidden = (pk >= t)[..., None, :].expand_as(s)
        if causal:
            hidden = hidden | (pk[..., None, :] > pq[..., :, None])
        if self.shared_qk:
            s = s.masked_fill(pk[..., None, :] == pq[..., :, None], SELF_SCORE)
        if rr > 1:
            s = s - torch.log(self._round_counts(order_q, order_k, pq, pk, n, c).to(acc))
        s = s.masked_fill(hidden, float("-inf"))
        p, lse = _softmax_lse(s, dim=-1)                                   # lse: (B, H, R, n, c, 1)
        o = (p.to(vs.dtype) @ vs).view(b, h, rr, tp, d)
        # Back to the original order, then weigh the rounds by how much mass each one found.
        undo = order_q.argsort(dim=-1)
        o = o.gather(3, undo.unsqueeze(-1).expand(-1, -1, -1, -1, d))
        lse = lse.view(b, h, rr, tp).gather(3, undo)
        w, _ = _softmax_lse(lse, dim=2)
        out = (w.unsqueeze(-1) * o.to(acc)).sum(dim=2)
        return out[:, :, :t].to(q.dtype)

    @staticmethod
    def _round_counts(order_q, order_k, pq, pk, n, c) -> torch.Tensor:
        """For every scored (query, key) pair: in how many rounds does this query's chunk window hold this key?"""
        # chunk index of each original position, per round: (B, H, R, Tp); int16 keeps the pair tests cheap
        chunk_q = (order_q.argsort(dim=-1) // c).to(torch.int16)
        chunk_k = chunk_q if order_k is order_q else (order_k.argsort(dim=-1) // c).to(torch.int16)
        counts = torch.zeros(pq.shape + (pk.shape[-1],), dtype=torch.uint8, device=pq.device)
        bq, bk = pq.flatten(2), pk.flatten(2)
        for r in range(chunk_q.shape[2]):  # one round at a time keeps this at one score tensor's size
            cq = chunk_q[:, :, r].gather(2, bq).view(pq.shape)[..., :, None]         # (B, H, R, n, c, 1)
            ck = chunk_k[:, :, r].gather(2, bk).view(pk.shape)[..., None, :]         # (B, H, R, n, 1, 2c)
            hit = ck == cq                                                           # same chunk
            if n > 1:
                hit |= ck == torch.remainder(cq - 1, n)                              # the chunk before
            counts += hit
        return counts.clamp(min=1)
