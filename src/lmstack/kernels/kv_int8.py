"""Paged decode attention over an int8 KV cache, read in place (kv_int8.cpp); the engine's int8 pool
(infer/kv_quant.py) calls it inside `decode_kernels()`.

Same contract as decode_ops.paged_decode_attention, but the pools are int8 (Hkv, S, D) with fp32 scales
(Hkv, S): attention over keys k * s_k and values v * s_v, computed without materialising them. Returns None
when the kernel does not apply (not CPU fp32 queries, autograd wanted, no extension); the caller then
dequantizes the keys it needs and runs the fp32 path. `write` stores a step's new K/V into the pool in one
call, with exactly kv_quant.quantize_kv's numbers (False: not applicable, use the torch path).

Usage:
    from lmstack.kernels import kv_int8
    o = kv_int8.paged_decode_attention_int8(q, kc, vc, ks, vs, key_slots, lengths, scale, window)  # (B, H, D)
    done = kv_int8.write(k, v, slots, kc, vc, ks, vs)     # k, v (Hkv, N, D) fp32 -> pools at slots (N,)
"""
from __future__ import annotations

import torch

from lmstack.kernels.build import extension


def paged_decode_attention_int8(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ks: torch.Tensor,
                                vs: torch.Tensor, key_slots: torch.Tensor, lengths: torch.Tensor, scale: float,
                                window: int = 0) -> torch.Tensor | None:
    """Softmax attention of q (B, H, D), one query per sequence, over the int8 keys at key_slots[b, :lengths[b]]
    (the last `window` when window > 0) of pools kc, vc with scales ks, vs; GQA by head groups. (B, H, D) or None."""
    if (q.dtype is not torch.float32 or q.device.type != "cpu" or q.stride(-1) != 1
            or (torch.is_grad_enabled() and q.requires_grad)):
        return None
    if not all(t.is_contiguous() for t in (kc, vc, ks, vs)):
        return None
    ext = extension()
    if ext is None or not hasattr(ext, "paged_decode_attention_int8"):
        return None
    return ext.paged_decode_attention_int8(q, kc, vc, ks, vs, key_slots.contiguous(), lengths.contiguous(),
                                           float(scale), int(window or 0))


def write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
          ks: torch.Tensor, vs: torch.Tensor) -> bool:
    """Quantize k, v (Hkv, N, D) per (head, token) into kc, vc (int8) and ks, vs (fp32) at slots; True when done."""
    if (k.dtype is not torch.float32 or v.dtype is not torch.float32 or k.device.type != "cpu"
            or k.stride(-1) != 1 or v.stride(-1) != 1 or slots.dtype is not torch.int64
            or not all(t.is_contiguous() for t in (kc, vc, ks, vs))):
        return False
    ext = extension()
    if ext is None or not hasattr(ext, "kv_int8_write"):
        return False
    ext.kv_int8_write(k, v, slots.contiguous(), kc, vc, ks, vs)
    return True
