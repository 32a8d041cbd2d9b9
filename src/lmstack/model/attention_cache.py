"""The one contract between the model's attention layers and any K/V cache: AttentionCache.

A cache is whatever holds keys and values between forward calls: the model's own contiguous and sink
caches (kv_cache.py), prefix tuning's wrapper (adapt/prefix.py), or a serving engine's paged pool, which
the engine passes in as `model(ids, cache=its_cache)`. The model only ever talks to this interface, so it
never learns which of them it runs with, nor that an engine exists.

The Transformer calls, per forward over T new tokens:
    q_pos, k_pos = cache.positions(T)          # before the layers: positions of the queries and of all keys
    out = cache.attend(layer, q, k, v, attn, ctx)   # in every layer: store this step's K/V, attend
    cache.advance(T)                           # after the layers
q is (B, H, T, D) and already rotated by RoPE; k is rotated too when `cache.rotated_keys` (a cache that
re-assigns positions, like the sink cache, stores raw keys and rotates them on read); v is (B, Hkv, T, D).
`attn` is the calling Attention module: its backend, scale, softcap and `attend_all` (the model's own
attention over whole key sets) are what a cache uses to compute attention the model's way. `ctx` is the
forward's ForwardContext: masks per layer, RoPE tables for keys, ALiBi slopes.

BackendCache is the common case: a cache that only stores. Its subclasses implement `update()`, which
appends this step's K/V and returns every key and value held; `attend()` then runs the model's own
backend over them with the forward's masks, exactly as an uncached forward does. A cache with its own
attention (the engine's paged pool: many sequences flattened into one row) implements `attend()` itself.

Usage:
    class MyCache(BackendCache):
        def positions(self, t): ...
        def update(self, layer, k, v): ...      # -> (all keys, all values)
        def advance(self, t): ...
    logits = model(ids, cache=MyCache())
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lmstack.model.positions import apply_rotary


class AttentionCache(ABC):
    """What every cache passed to Transformer.forward implements."""

    rotated_keys: bool = True
    """attend() receives keys already rotated by RoPE (False: raw keys, the cache rotates what it reads)."""
    window: int = 0
    """A sliding window the cache itself imposes on top of the model's (the sink cache's); 0 = none."""
    n_sink: int = 0
    """Keys at positions < n_sink stay visible to every query (attention sinks)."""

    @abstractmethod
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos, k_pos) for a forward over t new tokens: the queries' positions and every visible key's."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        """Store this step's K/V of `layer` and return the attention output (B, H, T, D) for q."""

    @abstractmethod
    def advance(self, t: int) -> None:
        """The forward over t tokens finished: count them as held."""

    def key_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """Document ids of the keys, given those of the new tokens (packed rows); a cache that puts keys
        of its own in front (prefix tuning) says which documents see them."""
        return doc_ids


class BackendCache(AttentionCache):
    """A cache that stores K/V and lets the model's own backend and masks compute the attention."""

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's K/V of `layer`; return every key and value now visible, (B, Hkv, Tk, D) each."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        if ctx.cos_q is not None and not self.rotated_keys:
            k = apply_rotary(k, *ctx.rope_k())
        return attn.attend_all(q, k, v, ctx, layer)
