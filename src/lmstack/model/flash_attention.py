"""FlashAttention-2 in PyTorch ops: a tiled forward and a tiled backward, as one torch.autograd.Function.

The forward (Dao et al. 2022; Dao 2023) walks K/V in tiles per query tile with the online softmax: a
running max and running sum per row, so no more than one Tq_tile x Tk_tile score tile exists at once.
It returns the output and, per query row, the log-sum-exp of its scores, L = m + log(l).

Autograd left to itself would keep every tile's scores and probabilities for the backward, which is as
much memory as naive attention. So the backward is our own: forward saves only q, k, v, the output O and
L (all linear in T), and the backward recomputes each tile's probabilities P = exp(S - L) and applies
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D)   with D = rowsum(dO * O),
    dQ = dS K * scale,   dK = dS^T Q * scale
tile by tile (FlashAttention-2, Algorithm 2). Tiles the mask hides entirely are skipped both ways.

Supported: any AttentionMask rule (causal, windows, sinks, Longformer/BigBird/dilated patterns, document
ids, key padding, prefix-LM), ALiBi slopes (constants, no gradient), a logit softcap (its tanh is
differentiated through), GQA/MQA (dK, dV summed over each K/V head's query group). Rows that see no key
at all (padding queries) output zeros and pass no gradient, like the naive backend.

Usage:
    out = flash_attention(q, k, v, mask, scale=D**-0.5, block_q=128, block_k=128)
    out.sum().backward()     # memory stays O(T) in the sequence length
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lmstack.model.masks import AttentionMask


def _kernels():
    # The score helpers live in backends.py (shared with the naive backend). They are looked up at call
    # time because backends.py imports this module.
    # lazy: cycle (lmstack.model imports this module)
    from lmstack.model import backends

    return backends


def _tiles(mask: AttentionMask, tq: int, tk: int, block_q: int, block_k: int):
    """Yield (q_slice, k_slice, visible or None) for every tile the mask does not hide entirely."""
    full = mask.is_full()
    for q0 in range(0, tq, block_q):
        q_sl = slice(q0, min(q0 + block_q, tq))
        for k0 in range(0, tk, block_k):
            k_sl = slice(k0, min(k0 + block_k, tk))
            state = "full" if full else mask.tile_state(q_sl, k_sl)
            if state == "empty":
                continue  # the whole tile is masked: skip its matmuls entirely
            visible = None if state == "full" else mask.block(q_sl, k_sl)
            if visible is not None and not bool(visible.any()):
                continue
            yield q_sl, k_sl, visible


def _tile_scores(kb, qt, kt, mask, slopes, softcap, scale, q_sl, k_sl, visible, acc_dtype):
    """Scores of one tile after softcap, ALiBi bias and mask; also tanh(s/cap) for the softcap's derivative."""
    s = kb._grouped_scores(qt, kt, scale).to(acc_dtype)
    capped = None
    if softcap:
        capped = torch.tanh(s / softcap)
        s = softcap * capped
    bias = kb._scores_bias(mask, slopes, q_sl, k_sl)
    if bias is not None:
        s = s + bias.to(acc_dtype)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s, capped


def _forward(q, k, v, mask, scale, slopes, softcap, block_q, block_k):
    kb = _kernels()
    b, h, tq, d = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation; fp64 inputs stay fp64
    row_max = torch.full((b, h, tq, 1), float("-inf"), dtype=acc_dtype, device=q.device)
    row_sum = torch.zeros((b, h, tq, 1), dtype=acc_dtype, device=q.device)
    acc = torch.zeros((b, h, tq, d), dtype=acc_dtype, device=q.device)
    for q_sl, k_sl, visible in _tiles(mask, tq, k.shape[2], block_q, block_k):
        s, _ = _tile_scores(kb, q[:, :, q_sl], k[:, :, k_sl], mask, slopes, softcap, scale, q_sl, k_sl, visible,
                            acc_dtype)
        m_old = row_max[:, :, q_sl]
        m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True))
        # Rows that have seen nothing yet keep a -inf max; shift by 0 there to avoid inf - inf.
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift)
        correction = torch.exp(m_old - shift)
        row_sum[:, :, q_sl] = row_sum[:, :, q_sl] * correction + p.sum(dim=-1, keepdim=True)
        acc[:, :, q_sl] = acc[:, :, q_sl] * correction + kb._grouped_mix(p, v[:, :, k_sl].to(acc_dtype))
        row_max[:, :, q_sl] = m_new
    seen = row_sum > 0
    out = torch.where(seen, acc / row_sum.clamp(min=1e-30), torch.zeros_like(acc)).to(q.dtype)
    # L = m + log(l). A row that saw no key gets +inf, so exp(S - L) = 0 for it in the backward.
    lse = torch.where(seen, row_max + torch.log(row_sum.clamp(min=1e-30)), torch.full_like(row_sum, float("inf")))
    return out, lse


def _backward(dout, q, k, v, out, lse, mask, scale, slopes, softcap, block_q, block_k):
    kb = _kernels()
    b, h, tq, d = q.shape
    hkv, g = k.shape[1], h // k.shape[1]
    acc_dtype = lse.dtype
    dout = dout.to(acc_dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
    delta = (dout * out.to(acc_dtype)).sum(-1, keepdim=True)  # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij
    for q_sl, k_sl, visible in _tiles(mask, tq, k.shape[2], block_q, block_k):
        qt, kt, vt = q[:, :, q_sl].to(acc_dtype), k[:, :, k_sl].to(acc_dtype), v[:, :, k_sl].to(acc_dtype)
        s, capped = _tile_scores(kb, qt, kt, mask, slopes, softcap, scale, q_sl, k_sl, visible, acc_dtype)
        p = torch.exp(s - lse[:, :, q_sl])                                  # recomputed, (B, H, tq, tk)
        do_t = dout[:, :, q_sl]
        n, m = p.shape[-2], p.shape[-1]
        # dV_j += P^T dO, summed over the query heads that share each K/V head (GQA).
        dv[:, :, k_sl] += (p.view(b, hkv, g, n, m).transpose(-1, -2) @ do_t.view(b, hkv, g, n, d)).sum(2)
        dp = kb._grouped_scores(do_t, vt, 1.0)                              # dO V^T, (B, H, tq, tk)
        ds = p * (dp - delta[:, :, q_sl])
        if capped is not None:
            ds = ds * (1 - capped * capped)                                 # d(cap*tanh(s/cap))/ds
        dq[:, :, q_sl] += kb._grouped_mix(ds, kt) * scale
        dk[:, :, k_sl] += (ds.view(b, hkv, g, n, m).transpose(-1, -2) @ qt.view(b, hkv, g, n, d)).sum(2) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """Tiled attention whose autograd graph holds q, k, v, O and L only (O(T) memory), not the tiles."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, slopes, softcap, block_q, block_k):
        out, lse = _forward(q, k, v, mask, scale, slopes, softcap, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.config = (mask, scale, softcap, block_q, block_k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        mask, scale, softcap, block_q, block_k = ctx.config
        dq, dk, dv = _backward(dout, q, k, v, out, lse, mask, scale, slopes, softcap, block_q, block_k)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q, k, v, mask: AttentionMask, scale: float, slopes=None, softcap: float = 0.0,
                    block_q: int = 128, block_k: int = 128) -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D), differentiable with O(T) saved memory."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    if slopes is not None and slopes.requires_grad:
        raise ValueError("ALiBi slopes are constants here; flash_attention does not differentiate them")
    return FlashAttention.apply(q, k, v, mask, scale, slopes, float(softcap), block_q, block_k)
