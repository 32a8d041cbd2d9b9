"""Attention backends: SDPA, naive, and a blockwise FlashAttention reference in pure PyTorch.

All three take q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H a multiple of Hkv (GQA), an
AttentionMask, optional ALiBi slopes and a logit softcap, and return (B, H, Tq, D).

- sdpa: torch.nn.functional.scaled_dot_product_attention, which picks flash / memory-efficient
  kernels on GPU. Fast paths: no mask for a full view, is_causal for the plain causal square.
- naive: materialises the T×T score matrix; the reference the others are checked against.
- blockwise: FlashAttention-2 (Dao et al. 2022; Dao 2023) written with torch ops, in flash_attention.py:
  it walks K/V in tiles, keeps a running max and running sum per query row (the online softmax), and
  never holds more than one Tq_tile × Tk_tile score tile, so memory grows linearly in T. Its backward is
  its own (an autograd.Function that saves only O and the log-sum-exp and recomputes the tiles), so
  training memory is linear in T too. Tiles the mask hides entirely are skipped both ways, which is
  what makes sparse patterns cheaper.

Usage:
    out = BACKENDS["blockwise"](q, k, v, mask, scale=D**-0.5)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.model.flash_attention import flash_attention
from lmstack.model.masks import AttentionMask
from lmstack.model.positions import alibi_bias


def _scores_bias(mask: AttentionMask, slopes: torch.Tensor | None, q_sl: slice, k_sl: slice) -> torch.Tensor | None:
    if slopes is None:
        return None
    return alibi_bias(slopes, mask.q_pos[q_sl], mask.k_pos[k_sl], mask.causal)[None]  # (1, H, tq, tk)


def _shape_facts(mask: AttentionMask) -> tuple[bool, bool]:
    """(is_plain_causal, is_full) of a mask, worked out once: a forward shares one mask among its layers,
    and is_full reads tensor values (a few ops and a sync) that would otherwise repeat in every layer."""
    facts = mask.__dict__.get("_sdpa_shape_facts")
    if facts is None:
        facts = mask.__dict__["_sdpa_shape_facts"] = (mask.is_plain_causal(), mask.is_full())
    return facts


def sdpa_attention(q, k, v, mask: AttentionMask, scale: float, slopes=None, softcap: float = 0.0,
                   dropout_p: float = 0.0) -> torch.Tensor:
    if softcap:
        raise ValueError("the sdpa backend cannot apply attn_logit_softcap; use 'naive' or 'blockwise'")
    gqa = q.shape[1] != k.shape[1]
    attn_mask, is_causal = None, False
    plain_causal, full = _shape_facts(mask)
    if slopes is None and plain_causal:
        is_causal = True
    elif slopes is not None or not full:
        visible = mask.dense()
        attn_mask = visible
        if slopes is not None:
            bias = _scores_bias(mask, slopes, slice(None), slice(None)).to(q.dtype)
            attn_mask = bias.masked_fill(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          dropout_p=dropout_p, enable_gqa=gqa)


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q·k^T for GQA without copying K: (B, Hkv, G, Tq, D) @ (B, Hkv, 1, D, Tk) -> (B, H, Tq, Tk)."""
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    s = q.view(b, hkv, h // hkv, tq, d) @ k.unsqueeze(2).transpose(-1, -2)
    return s.view(b, h, tq, -1) * scale


def _grouped_mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p @ v for GQA: p (B, H, Tq, Tk), v (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    b, h, tq, tk = p.shape
    hkv = v.shape[1]
    return (p.view(b, hkv, h // hkv, tq, tk) @ v.unsqueeze(2)).view(b, h, tq, -1)


def naive_attention(q, k, v, mask: AttentionMask, scale: float, slopes=None, softcap: float = 0.0,
                    dropout_p: float = 0.0) -> torch.Tensor:
    s = _grouped_scores(q, k, scale).float()
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    bias = _scores_bias(mask, slopes, slice(None), slice(None))
    if bias is not None:
        s = s + bias
    if not mask.is_full():
        s = s.masked_fill(~mask.dense(), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key (padding queries) give zeros, not NaN
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return _grouped_mix(p.to(v.dtype), v)


def blockwise_attention(q, k, v, mask: AttentionMask, scale: float, slopes=None, softcap: float = 0.0,
                        dropout_p: float = 0.0, block_q: int = 128, block_k: int = 128) -> torch.Tensor:
    if dropout_p:
        raise ValueError("the blockwise backend has no attention dropout")
    # FlashAttention-2: tiled forward and our own tiled backward (flash_attention.py), so training keeps
    # O(T) memory instead of autograd saving every score tile.
    return flash_attention(q, k, v, mask, scale, slopes=slopes, softcap=softcap, block_q=block_q, block_k=block_k)


BACKENDS = {"sdpa": sdpa_attention, "naive": naive_attention, "blockwise": blockwise_attention}
