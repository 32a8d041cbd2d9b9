"""int8 KV cache: the engine's paged K/V pool stored as int8 with one fp32 scale per (token, KV head).

`kv_cache_dtype="int8"` (LLMEngine, lmstack.LLM, `lmstack serve/generate --kv_cache_dtype int8`) makes
PagedKVCache (paged_attention.py) keep K and V as int8 numbers plus fp32 scales; "auto" (the default) keeps
them in the model's dtype, exactly as before.

The scheme, and why:
- Symmetric absmax per (token, KV head): a token's key (or value) vector of head_dim numbers in one head
  is stored as q = round(x / s), clamped to [-127, 127], with s = max|x| / 127 (fp32). Dequantized,
  q * s is within s / 2 of x in every element (half a quantization step).
- Per token rather than per block: writing a token never changes the scale of the tokens already in its
  block, so nothing is ever re-quantized, copy-on-write and token-tree slot moves (copy_blocks,
  move_slots) copy scales with their numbers, and a prefix-cache hit reads exactly the numbers the first
  request wrote. A per-block scale would have to grow as outlier tokens arrive, re-rounding the block's
  earlier tokens each time. The cost is 4 bytes of scale per head_dim int8 numbers: for head_dim 64,
  2 * (64 + 4) = 136 bytes per layer and KV head against 512 in fp32 (3.76x) or 256 in bf16 (1.88x).
  Measured on the speedrun model (benchmarks/kv_cache_int8_schemes.py, 16k held-out tokens through the cache):
  per token +0.017% perplexity (stderr 0.007%), per block of 16 re-rounded as it fills +0.018% (0.008%): the
  same quality, so the simpler scheme, at 6% more bytes than per block's 1028 per token.
- Every attention read sees dequantized numbers, including a prompt chunk attending to itself: the engine's
  output is then a function of the tokens alone, not of how the scheduler chunked them or of which blocks
  came from the prefix cache.
- Reads gather the slots a step needs, dequantize them to the model's dtype, and attend with the same
  SDPA / attention backends as the "auto" pool. The engine's CPU fp32 decode steps (decode_kernels()) instead
  call kernels/kv_int8.cpp, which reads the int8 pool and its scales in place (q . s k = s (q . k)); without
  the extension they dequantize the visible keys into a compact pool for the fp32 C++ decode attention.

Usage:
    q, s = quantize_kv(x)                      # x (..., head_dim) -> int8 (..., head_dim), fp32 scale (...)
    x_hat = dequantize_kv(q, s, torch.float32)
    kv_cache_bytes_per_token(cfg, torch.float32, "int8")   # pool bytes one token takes (numbers + scales)
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.model.counting import kv_bytes_per_token

KV_CACHE_DTYPES = ("auto", "int8")
"""auto: the model's dtype (what the pool always was); int8: int8 numbers with fp32 per-(token, head) scales."""

SCALE_BYTES = 4  # one fp32 scale per token, KV head, layer and K/V
_QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


def check_kv_cache_dtype(value) -> str:
    if value not in KV_CACHE_DTYPES:
        raise LmstackError(f"kv_cache_dtype must be one of {', '.join(repr(v) for v in KV_CACHE_DTYPES)}, "
                           f"got {value!r}")
    return value


def kv_cache_bytes_per_token(cfg, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token takes in the paged pool, every layer, K and V: for "auto" the numbers in the model's
    dtype; for "int8" one byte per number plus one fp32 scale per (layer, KV head, K/V)."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return kv_bytes_per_token(cfg, torch.finfo(dtype).bits // 8)
    return kv_bytes_per_token(cfg, 1) + 2 * cfg.n_layers * cfg.n_kv_heads * SCALE_BYTES


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> (int8 (..., D), fp32 scale (...)) with x ~= q * scale, error <= scale / 2."""
    xf = x.float()
    # an all-zero vector gets a tiny positive scale so the division is defined; its q is 0 either way
    scale = (xf.abs().amax(dim=-1) / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xf / scale[..., None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (..., D) and fp32 scale (...) -> q * scale in dtype."""
    return (q.float() * scale[..., None]).to(dtype)
