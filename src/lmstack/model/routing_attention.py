"""Routing Transformer attention (Roy et al. 2021): online k-means routes tokens to clusters, and each query
attends only to keys of its own cluster.

Per routing head, n_clusters unit-length centroids live in a buffer (saved with the model). A token's routing
vector is u = normalise(q/|q| + k/|k|) (with shared QK, q = k, this is the paper's routing by the normalised
query, which is also the key); the token joins the centroid nearest to u, so its query and its key sit in the
same cluster and a query always has a key to see: its own. Scores are the ordinary q.k/sqrt(d) on the raw q
and k, so with one cluster and w >= T this is exactly full attention.

Bounded cost, causally: tokens are sorted by (cluster, position) and cut into chunks of w, each chunk scoring
itself and the chunk before, so the score tensor is T x 2w instead of T x T. Causal: a query sees the last w
keys of its cluster up to itself (its own key included); bidirectional: the keys of its cluster in its chunk
and the chunk before (Reformer's rule). w = ceil(T / n_clusters) unless routing_window says otherwise.

Where this differs from the paper, and why: the paper balances clusters by letting every centroid take its w
nearest tokens of the whole sequence (top-k). That choice lets a later token push an earlier one out of a
cluster, so an earlier output depends on the future and decoding could not reproduce training. Here a token's
cluster depends on itself only and the window of w most recent same-cluster keys keeps each query's cost at w.

Centroids learn by mini-batch k-means, not by gradients: in training each forward moves every centroid toward
the mean of the routing vectors assigned to it by an exponential moving average (routing_ema_decay), then
renormalises it; centroids nobody chose stay, and eval leaves them all alone.

The paper mixes local-attention heads with routing heads: the first routing_local_heads heads attend to a
causal window of the w most recent keys (the same chunked kernel with every token in one cluster).

Usage (selected by ModelConfig.attention = "routing"):
    attn = RoutingAttention(cfg)     # routing_n_clusters, routing_window, routing_local_heads, routing_ema_decay
    out = attn(q, k, v, causal=True) # q (B, H, T, D), k and v (B, H or Hkv, T, D)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _look_back(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n, w, ...) -> (B, H, n, 2w, ...): each chunk after the one before it (chunk 0's is the last one,
    wrapped, which the caller masks)."""
    return x if n == 1 else torch.cat([x.roll(1, dims=2), x], dim=3)


SCORE_BUDGET = 1 << 22  # score entries per call: longer inputs are done a few heads at a time (16 MB in fp32)


def windowed_attention(q, k, v, cluster: torch.Tensor, w: int, causal: bool, scale: float) -> torch.Tensor:
    """Attention of every query over keys of its own cluster: causal, the last w of them up to itself;
    bidirectional, those in its chunk and the one before, chunks of w in (cluster, position) order.
    q, k (B, H, T, D), v (B, H, T, Dv), cluster (B, H, T) integer ids >= 0."""
    b, h, t, _ = q.shape
    per_head = b * math.ceil(t / w) * w * 2 * w
    step = max(1, SCORE_BUDGET // per_head)
    if step >= h:
        return _windowed(q, k, v, cluster, w, causal, scale)
    # Heads are independent: a few at a time keeps the transient copies and scores of one call small.
    return torch.cat([_windowed(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], cluster[:, i:i + step],
                                w, causal, scale) for i in range(0, h, step)], dim=1)


def _windowed(q, k, v, cluster: torch.Tensor, w: int, causal: bool, scale: float) -> torch.Tensor:
    b, h, t, d = q.shape
    n = math.ceil(t / w)
    tp = n * w
    pos = torch.arange(t, device=q.device)
    order = (cluster * t + pos).argsort(dim=-1)                                     # by cluster, then position

    def sort(x):
        x = x.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
        return F.pad(x, (0, 0, 0, tp - t)).view(b, h, n, w, x.shape[-1])

    cid = F.pad(cluster.gather(2, order), (0, tp - t), value=-1).view(b, h, n, w)   # padding: cluster -1
    qs, ks, vs = sort(q), _look_back(sort(k), n), _look_back(sort(v), n)
    ck = _look_back(cid, n)
    iq = torch.arange(tp, device=q.device).view(n, w)                               # sorted index of each query
    ik = iq if n == 1 else torch.cat([iq - w, iq], dim=1)                           # chunk 0's look-back: < 0
    off = (ik < 0)[:, None, :]                                                      # (n, 1, 2w), same for all
    if causal:  # same cluster and sorted by position, so "the last w" is a sorted-index gap of 0..w-1
        gap = iq[:, :, None] - ik[:, None, :]
        off = off | (gap < 0) | (gap >= w)
    hidden = cid[..., :, None] != ck[..., None, :]                                  # (B, H, n, w, 2w)
    hidden |= off
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (qs @ ks.transpose(-1, -2)).to(acc) * scale
    # In place: these scores are needed by nothing else (saves one score-sized tensor at long T). Every real
    # query sees at least its own key; a padded row sees padding, so no row is empty (no NaN).
    p = torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)
    o = (p.to(vs.dtype) @ vs).view(b, h, tp, -1)[:, :, :t]
    return o.gather(2, order.argsort(dim=-1).unsqueeze(-1).expand(-1, -1, -1, o.shape[-1]))


class RoutingAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_clusters = cfg.routing_n_clusters
        self.window = cfg.routing_window
        self.n_local = cfg.routing_local_heads
        self.decay = cfg.routing_ema_decay
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        n_routing = cfg.n_heads - self.n_local
        # A buffer, not a parameter: k-means moves it, gradients never do; persistent, so checkpoints keep it.
        self.register_buffer("centroids", F.normalize(torch.randn(n_routing, self.n_clusters, cfg.head_dim), dim=-1))

    def window_for(self, t: int) -> int:
        """Keys each query may see (routing and local heads): routing_window, or ceil(T / n_clusters)."""
        return min(t, self.window or math.ceil(t / self.n_clusters))

    def forward(self, q, k, v, causal: bool) -> torch.Tensor:
        h = q.shape[1]
        if k.shape[1] != h:  # GQA: every query head routes its own copy of the keys
            k = k.repeat_interleave(h // k.shape[1], 1)
        if v.shape[1] != h:
            v = v.repeat_interleave(h // v.shape[1], 1)
        w = self.window_for(q.shape[2])
        loc = self.n_local
        parts = []
        if loc:  # local heads: one cluster holding every token, so the window is the w most recent keys
            one = torch.zeros(q.shape[0], loc, q.shape[2], dtype=torch.long, device=q.device)
            parts.append(windowed_attention(q[:, :loc], k[:, :loc], v[:, :loc], one, w, causal, self.scale))
        if loc < h:
            q, k, v = q[:, loc:], k[:, loc:], v[:, loc:]
            with torch.no_grad():
                u, cluster = self.route(q, k)
                if self.training:
                    self._kmeans_step(u, cluster)
            parts.append(windowed_attention(q, k, v, cluster, w, causal, self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def route(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing vectors u (B, H, T, D), unit length, and each token's nearest centroid (B, H, T)."""
        u = F.normalize(F.normalize(q, dim=-1) + F.normalize(k, dim=-1), dim=-1)
        return u, torch.einsum("bhtd,hcd->bhtc", u, self.centroids.to(u.dtype)).argmax(dim=-1)

    @torch.no_grad()
    def _kmeans_step(self, u: torch.Tensor, cluster: torch.Tensor) -> None:
        """One mini-batch spherical k-means step by exponential moving average; unchosen centroids stay."""
        hr, c, d = self.centroids.shape
        slot = (cluster + torch.arange(hr, device=cluster.device)[None, :, None] * c).reshape(-1)
        sums = torch.zeros(hr * c, d, device=u.device).index_add_(0, slot, u.float().reshape(-1, d))
        counts = torch.zeros(hr * c, device=u.device).index_add_(0, slot, torch.ones(slot.shape, device=u.device))
        mean = (sums / counts.clamp(min=1).unsqueeze(-1)).view(hr, c, d)
        old = self.centroids.float()
        moved = F.normalize(self.decay * old + (1 - self.decay) * mean, dim=-1)
        self.centroids.copy_(torch.where((counts > 0).view(hr, c, 1), moved, old))
