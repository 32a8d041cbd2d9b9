"""The decode step's small ops as single C++ calls (decode_ops.cpp): RMSNorm, RoPE, and the paged attention of one
new token per sequence.

A decode step runs each of these on a handful of rows, where torch's dispatch and temporaries cost more than
the arithmetic (the module docstring of decode_ops.cpp counts them). Each function here computes the same math
as the torch expression named in its docstring, within fp32 rounding, and falls back to that expression for
anything the kernel does not take (not fp32, not CPU, autograd wanted, too many rows, no extension). The model
calls them only inside `decode_kernels()` (model/linear.py), that is, in the inference engine's steps.

Usage:
    from lmstack.kernels import decode_ops
    y = decode_ops.rms_norm(x, weight, eps)              # torch.rms_norm(x, weight.shape, weight, eps)
    qk = decode_ops.rope(qk, cos, sin)                   # x * cos + rotate_half(x) * sin, tables (T, 1, D)
    o = decode_ops.paged_decode_attention(q, kc, vc, key_slots, lengths, scale, window)   # (B, H, D)
"""
from __future__ import annotations

import torch

from lmstack.kernels.build import extension

# Above this many rows an op is no longer dispatch-bound and torch's multi-threaded version is as fast: the
# kernels here run on one thread (except attention), so prefill chunks keep torch's ops.
MAX_ROWS = 64


def _ok(*tensors: torch.Tensor) -> bool:
    """Every tensor is fp32 on the CPU and no gradient is wanted."""
    for t in tensors:
        if t.dtype is not torch.float32 or t.device.type != "cpu":
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.rms_norm(x, weight.shape, weight, eps) over the last dimension."""
    d = x.shape[-1]
    if _ok(x, weight) and 0 < x.numel() <= MAX_ROWS * d and weight.dim() == 1 and weight.shape[0] == d:
        ext = extension()
        if ext is not None:
            return ext.rms_norm_rows(x.reshape(-1, d).contiguous(), weight.contiguous(), eps).view(x.shape)
    return torch.rms_norm(x, weight.shape, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, T, N, D) by tables cos/sin (T, 1, D) or (T, D):
    x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin."""
    if (x.dim() == 4 and _ok(x, cos, sin) and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
            and 0 < x.shape[0] * x.shape[1] * x.shape[2] <= MAX_ROWS * 16
            and cos.shape[0] == x.shape[1] and cos.shape[-1] == x.shape[-1]):
        ext = extension()
        if ext is not None:
            t, d = x.shape[1], x.shape[-1]
            return ext.rope_rows(x, cos.reshape(t, d).contiguous(), sin.reshape(t, d).contiguous())
    if cos.dim() == 2:  # (T, D) tables: broadcast over the heads of x (B, T, N, D)
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def paged_decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, key_slots: torch.Tensor,
                           lengths: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor | None:
    """Softmax attention of q (B, H, D), one query per sequence, over the keys at key_slots[b, :lengths[b]]
    (the last `window` of them when window > 0) of one layer's pools kc, vc (Hkv, S, D); GQA by head groups.
    Returns (B, H, D), or None when the kernel does not apply (the caller then runs its SDPA path)."""
    if not _ok(q, kc, vc) or q.stride(-1) != 1 or not kc.is_contiguous() or not vc.is_contiguous():
        return None
    ext = extension()
    if ext is None:
        return None
    return ext.paged_decode_attention(q, kc, vc, key_slots.contiguous(), lengths.contiguous(), float(scale),
                                      int(window or 0))
