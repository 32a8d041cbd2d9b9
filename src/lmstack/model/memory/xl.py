"""Transformer-XL segment-level recurrence (Dai et al. 2019) for a plain lmstack Transformer.

A long sequence is cut into segments of seg_len tokens. While segment s runs, every layer also attends
over a memory: the last mem_len attention inputs (hidden states) that layer saw in the segments before.
The memory is detached (gradient stopped), so backward never walks into an earlier segment's graph, and
it is projected to keys and values with the layer's *current* k/v weights inside `attend()`, so W_k and
W_v still learn from the memory, as in the paper. Cost per segment is O(seg_len * (mem_len + seg_len)),
while the context a token can reach grows with depth (n_layers * mem_len tokens back).

Positions: the memory and the segment share one local frame, the memory at 0..m-1 and the segment at
m..m+t-1, so positions continue across the memory. With RoPE a score depends only on the offset between
query and key, which is exactly Transformer-XL's relative property; this is RoPE across the memory, not
Transformer-XL's own relative encoding (sinusoidal R_{i-j} with the u/v biases), an explicit choice issue 22
allows. ALiBi works the same way (its bias is a function of the offset); position='none' needs nothing.
Learned and sinusoidal absolute positions cannot continue across a memory and are refused.

The memory needs each layer's attention *input*, which attend() (handed q, k, v) never sees: `attach()`
installs a forward pre-hook on every Attention module for the duration of a `with` block, and the hook
records the input only when that forward runs with this memory as its cache.

Usage:
    memory = XLMemory(model, mem_len=64)
    with memory.attach():
        for segment in ids.split(64, dim=1):
            logits = model(segment, cache=memory)      # attends over [memory; segment] causally
    logits, loss = xl_forward(model, ids, seg_len=64, mem_len=64, targets=targets)   # the same, in one call
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.attention import Attention
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.memory.running import check_segment_call, run_segments, segment_loss
from lmstack.model.positions import apply_rotary


def _check_model(cfg) -> None:
    """Refuse configs whose attention cannot continue across a memory, naming the conflict."""
    if cfg.position in ("learned", "sinusoidal"):
        raise LmstackError(f"Transformer-XL memory needs relative positions, but position={cfg.position!r} adds "
                           "absolute embeddings that cannot continue across the memory; use rope, alibi or none")
    if cfg.attention != "softmax":
        raise LmstackError(f"Transformer-XL memory needs softmax attention over a key set, got attention={cfg.attention!r}")
    if not cfg.causal:
        raise LmstackError("Transformer-XL memory is for causal (decoder) models; this config has causal=False")
    if cfg.sparse_pattern != "none":
        raise LmstackError(f"Transformer-XL memory does not combine with sparse_pattern={cfg.sparse_pattern!r}: "
                           "its global tokens would be memory slots")


def _project_kv(attn: Attention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (unrotated, k-normed) and values (B, Hkv, M, D) of hidden states h (B, M, d_model) under the
    layer's current projections: the gradient reaches W_k and W_v, not h."""
    b, m, _ = h.shape
    fused = attn.qkv_proj
    if fused is not None:
        _, k, v = fused(h).split(fused.split_sizes(), dim=-1)
    else:
        k, v = attn.k_proj(h), attn.v_proj(h)
    k = k.view(b, m, -1, attn.head_dim).transpose(1, 2)
    v = v.view(b, m, -1, attn.head_dim).transpose(1, 2)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    return k, v


class XLMemory(AttentionCache):
    """Per-layer memory of the last mem_len attention inputs, detached; an AttentionCache for model(ids, cache=...)."""

    long_memory = True  # a memory model may run with this cache (Transformer.forward checks)
    rotated_keys = True  # this segment's keys arrive rotated at their positions; memory keys are rotated here

    def __init__(self, model: nn.Module, mem_len: int):
        cfg = model.config
        _check_model(cfg)
        if mem_len < 0:
            raise LmstackError(f"mem_len must be >= 0, got {mem_len}")
        if mem_len >= cfg.max_seq_len:
            raise LmstackError(f"mem_len={mem_len} leaves no room for a segment in the model's max_seq_len="
                               f"{cfg.max_seq_len} window (memory + segment must fit in it); lower mem_len")
        self.model, self.mem_len, self.max_len = model, mem_len, cfg.max_seq_len
        self.memory: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.length = 0  # memory slots held (the same in every layer)
        self._inputs: dict[int, torch.Tensor] = {}  # this forward's attention inputs, from the hooks
        self._pending: dict[int, torch.Tensor] = {}  # inputs attended over, folded into the memory by advance()
        self._attached = 0

    def reset(self) -> None:
        """Forget the memory (a new document)."""
        self.memory = [None] * len(self.memory)
        self.length = 0
        self._inputs.clear()
        self._pending.clear()

    @contextlib.contextmanager
    def attach(self):
        """Hooks on every Attention module that hand this memory their input while it is the forward's cache."""
        if getattr(self.model, "checkpoint_blocks", False):
            # a recomputed block would read the memory as it is at backward time, not as the forward saw it
            raise LmstackError("Transformer-XL memory cannot run with activation checkpointing "
                               "(model.checkpoint_blocks); switch it off for XL training")

        def record(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            ctx = args[1] if len(args) > 1 else kwargs["ctx"]
            layer = args[2] if len(args) > 2 else kwargs["layer"]
            if ctx.cache is self:
                self._inputs[layer] = x

        handles = [m.register_forward_pre_hook(record, with_kwargs=True)
                   for m in self.model.modules() if isinstance(m, Attention)]
        self._attached += 1
        try:
            yield self
        finally:
            self._attached -= 1
            for handle in handles:
                handle.remove()

    # ---- the AttentionCache contract
    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._attached:
            raise LmstackError("XLMemory needs the layers' attention inputs: run the model inside "
                               "`with memory.attach():` (or use xl_forward)")
        if self.length + t > self.max_len:
            raise LmstackError(f"memory ({self.length}) + segment ({t}) = {self.length + t} positions exceed the "
                               f"model's max_seq_len={self.max_len}; use shorter segments or a smaller mem_len")
        device = next((m.device for m in self.memory if m is not None), None)
        k_pos = torch.arange(self.length + t, device=device)
        return k_pos[self.length:], k_pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, ctx) -> torch.Tensor:
        x = self._inputs.pop(layer, None)
        if x is None:
            raise LmstackError(f"XLMemory got no attention input for layer {layer}: run the model inside "
                               "`with memory.attach():` (or use xl_forward)")
        mem = self.memory[layer]
        if mem is not None:
            if mem.shape[0] != x.shape[0]:
                raise LmstackError(f"the memory holds batch size {mem.shape[0]} but this segment has {x.shape[0]}; "
                                   "call memory.reset() before a new batch")
            k_mem, v_mem = _project_kv(attn, mem.to(x.dtype))
            if ctx.cos_q is not None:  # RoPE: rotate the memory keys at their slots 0..m-1
                cos, sin = ctx.rope_k()
                k_mem = apply_rotary(k_mem, cos[:mem.shape[1]], sin[:mem.shape[1]])
            k, v = torch.cat((k_mem, k), dim=2), torch.cat((v_mem, v), dim=2)
        self._pending[layer] = x
        return attn.attend_all(q, k, v, ctx, layer)

    def advance(self, t: int) -> None:
        # The memory moves on only after every layer has read the old one.
        for layer, x in self._pending.items():
            old = self.memory[layer]
            held = x if old is None else torch.cat((old, x), dim=1)
            self.memory[layer] = held[:, max(held.shape[1] - self.mem_len, 0):].detach() if self.mem_len else None
        self._pending.clear()
        self.length = min(self.length + t, self.mem_len)

    def key_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        raise LmstackError("Transformer-XL memory does not take doc_ids: it carries one document across segments; "
                           "run each document on its own (memory.reset() between them)")

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.memory if m is not None)


def xl_forward(model: nn.Module, ids: torch.Tensor, seg_len: int, mem_len: int | None = None,
               targets: torch.Tensor | None = None, memory: XLMemory | None = None,
               ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ids (B, T) segment by segment with Transformer-XL memory: (logits (B, T, vocab), loss or None).

    mem_len defaults to seg_len. targets (B, T) gives the mean cross-entropy over targets != ignore_index,
    plus the MoE auxiliary loss averaged over segments. Pass `memory` (an XLMemory) to carry it across calls,
    e.g. across a trainer's steps over consecutive windows of one stream, as Transformer-XL trains; it is
    updated in place."""
    check_segment_call(ids, seg_len, targets)
    if memory is None:
        memory = XLMemory(model, seg_len if mem_len is None else mem_len)
    elif mem_len is not None and mem_len != memory.mem_len:
        raise LmstackError(f"mem_len={mem_len} conflicts with the given memory's mem_len={memory.mem_len}")
    if memory.mem_len + seg_len > memory.max_len:
        raise LmstackError(f"mem_len={memory.mem_len} + seg_len={seg_len} exceed the model's max_seq_len="
                           f"{memory.max_len}, the window one segment can attend; lower one of them")
    logits, aux = run_segments(model, ids, seg_len, memory)
    if targets is None:
        return logits, None
    return logits, segment_loss(logits, targets, ignore_index) + aux
