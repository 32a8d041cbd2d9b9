"""Linear-cost attention: Performer random features and Linformer low-rank K/V projection.

- Performer (Choromanski et al. 2021, FAVOR+): exp(q·k/sqrt(d)) = E[phi(q)·phi(k)] with positive random
  features phi(x) = exp(w·x - |x|^2/2)/sqrt(m), w drawn as orthogonal Gaussian blocks. Attention becomes
  phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1): O(T m d) instead of O(T^2 d). Causal attention uses running
  sums, computed chunk by chunk so memory stays O(T m + C^2) rather than O(T m d).
  The estimate converges to softmax attention as the feature count m grows.
- Linformer (Wang et al. 2020): keys and values are projected along the sequence to k rows, E K and F V,
  so the score matrix is T × k. It is bidirectional only (a projection over the whole sequence sees the
  future). E and F start as block-mean pooling, which is exact when k equals the sequence length and a
  smooth average otherwise; training then adapts them.

Usage (selected by ModelConfig.attention):
    attn = LINEAR_ATTENTION["performer"](cfg)
    out = attn(q, k, v, causal=True)      # q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d) rows that are orthogonal within each block of d, with norms of Gaussian vectors (FAVOR+)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(q.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


class PerformerAttention(nn.Module):
    def __init__(self, cfg, seed: int = 0, chunk: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("features", orthogonal_gaussian(cfg.performer_features, cfg.head_dim, g))
        self.chunk = chunk

    def _phi(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        x = x * x.shape[-1] ** -0.25  # so that phi(q)·phi(k) estimates exp(q·k / sqrt(d))
        proj = x @ self.features.T.to(x.dtype)
        sq = x.pow(2).sum(-1, keepdim=True) / 2
        # Subtracting a max keeps exp() finite; per-row for queries and one global constant for keys,
        # both of which cancel between numerator and denominator.
        shift = proj.amax(-1, keepdim=True) if is_query else proj.amax(dim=(-1, -2), keepdim=True)
        return torch.exp(proj - sq - shift.detach()) / math.sqrt(self.features.shape[0]) + 1e-6

    def forward(self, q, k, v, causal: bool) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        qf, kf = self._phi(q.float(), True), self._phi(k.float(), False)
        v = v.float()
        if not causal:
            kv = kf.transpose(-1, -2) @ v                      # (B, H, m, D)
            norm = qf @ kf.sum(dim=2, keepdim=True).transpose(-1, -2)
            return ((qf @ kv) / norm).to(q.dtype)
        b, h, t, m = qf.shape
        state = torch.zeros(b, h, m, v.shape[-1], dtype=v.dtype, device=v.device)
        zsum = torch.zeros(b, h, m, 1, dtype=v.dtype, device=v.device)
        out = torch.empty_like(v)
        for s in range(0, t, self.chunk):
            e = min(s + self.chunk, t)
            qc, kc, vc = qf[:, :, s:e], kf[:, :, s:e], v[:, :, s:e]
            local = torch.tril(qc @ kc.transpose(-1, -2))    # within-chunk causal part, C × C
            num = qc @ state + local @ vc
            den = qc @ zsum + local.sum(-1, keepdim=True)
            out[:, :, s:e] = num / den
            state = state + kc.transpose(-1, -2) @ vc
            zsum = zsum + kc.sum(dim=2, keepdim=True).transpose(-1, -2)
        return out.to(q.dtype)


class LinformerAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, k = cfg.max_seq_len, cfg.linformer_k
        pool = torch.zeros(k, n)
        for i in range(k):  # block-mean pooling: row i averages positions [i*n/k, (i+1)*n/k)
            lo, hi = (i * n) // k, max(((i + 1) * n) // k, (i * n) // k + 1)
            pool[i, lo:hi] = 1.0 / (hi - lo)
        self.proj_k = nn.Parameter(pool.clone())
        self.proj_v = nn.Parameter(pool.clone())
        self.scale = cfg.head_dim ** -0.5

    def forward(self, q, k, v, causal: bool) -> torch.Tensor:
        if causal:
            raise ValueError("Linformer attention is bidirectional only; set causal=False")
        t = k.shape[2]
        # A shorter sequence uses the first t columns, renormalised so each pooled row is still an average.
        ek, ev = self.proj_k[:, :t], self.proj_v[:, :t]
        ek = ek / ek.sum(-1, keepdim=True).clamp(min=1e-6) * (self.proj_k.sum(-1, keepdim=True))
        ev = ev / ev.sum(-1, keepdim=True).clamp(min=1e-6) * (self.proj_v.sum(-1, keepdim=True))
        keep = ek.abs().sum(-1) > 0  # rows that see none of the t positions drop out
        kp, vp = ek[keep] @ k, ev[keep] @ v                   # (B, Hkv, k, D)
        groups = q.shape[1] // k.shape[1]
        kp, vp = kp.repeat_interleave(groups, 1), vp.repeat_interleave(groups, 1)
        p = torch.softmax((q @ kp.transpose(-1, -2)).float() * self.scale, dim=-1)
        return (p.to(v.dtype) @ vp)


LINEAR_ATTENTION = {"performer": PerformerAttention, "linformer": LinformerAttention}
