"""The model core's own KV caches (the paged engine has its own pool, infer/paged_attention.py): a contiguous
preallocated cache and a rolling sink cache, used by reference_decode, SinkCacheChat and TP decoding.

- KVCache preallocates (layers, B, Hkv, max_len, D) once; prefill writes T positions, each decode step
  writes one, and attention reads the filled prefix. Keys are stored already rotated by RoPE, so
  nothing is recomputed per step: one new token costs O(1) projections instead of re-running the
  whole prefix (which is O(T) per token without a cache).
- SinkCache (StreamingLLM, Xiao et al. 2023) keeps the first n_sink tokens plus the last window-1
  tokens, so memory stays flat however long generation runs. Positions are re-assigned inside the
  cache (sinks 0..n_sink-1, then the window in order), so keys are stored *unrotated* and rotated
  when read; relative offsets inside the window stay exact. With n_sink=0 and window equal to a
  Mistral-style model's sliding window it reproduces the full forward pass exactly.

Both are BackendCaches (attention_cache.py, the one interface every cache implements): they store K/V
in update() and the model's own backend and masks compute the attention over what update() returns.
    q_pos, k_pos = cache.positions(T)     # before the layers run
    k_all, v_all = cache.update(layer, k, v)   # inside cache.attend(...), per layer
    cache.advance(T)                      # after the layers ran

Usage:
    cache = model.new_cache(batch_size=1, max_len=256)            # contiguous
    cache = model.new_cache(batch_size=1, kind="sink", window=64)  # bounded memory
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.model.attention_cache import BackendCache


class KVCache(BackendCache):
    rotated_keys = True  # keys are stored after RoPE
    window = 0
    n_sink = 0

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0
        self._arange = torch.arange(max_len, device=device)

    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + t > self.max_len:
            raise LmstackError(
                f"the KV cache holds {self.max_len} positions but {self.pos} are filled and {t} more were given; "
                "create the cache with a larger max_len (at most the model's max_seq_len for learned positions)"
            )
        return self._arange[self.pos:self.pos + t], self._arange[:self.pos + t]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class SinkCache(BackendCache):
    rotated_keys = False  # positions shift as the window rolls, so keys are rotated on read

    def __init__(self, n_layers: int, window: int, n_sink: int = 4):
        if window < 1:
            raise LmstackError(f"a sink cache needs window >= 1, got {window}")
        self.window, self.n_sink = window, n_sink
        self.capacity = n_sink + window - 1  # what is kept between steps
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # tokens currently held
        self.seen = 0  # tokens processed in total

    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_pos = torch.arange(self.length + t)
        return k_pos[self.length:], k_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        n = k.shape[2]
        if n > self.capacity:
            keep = torch.cat((torch.arange(self.n_sink), torch.arange(n - (self.window - 1), n)))
            self.k[layer], self.v[layer] = k[:, :, keep], v[:, :, keep]
        else:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t: int) -> None:
        self.seen += t
        self.length = min(self.length + t, self.capacity)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)
