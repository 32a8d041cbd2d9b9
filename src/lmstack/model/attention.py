"""Multi-head attention with grouped K/V heads (MHA, GQA, MQA), optional QK-norm, RoPE or ALiBi,
and any backend from backends.py.

GQA (Ainslie et al. 2023) shares each K/V head among n_heads/n_kv_heads query heads, which shrinks
the KV cache by that factor; n_kv_heads = 1 is MQA (Shazeer 2019).

With a cache, the cache computes the layer's attention: `cache.attend(layer, q, k, v, self, ctx)`, the one
interface every cache implements (attention_cache.py). The model's own caches store K/V and call back
`attend_all`, the backend over whole key sets that an uncached forward uses; a serving engine's paged
cache runs its own kernel. The layer never asks which kind it has.

With cfg.fused_projections the q/k/v projections are one `qkv_proj` Linear (fused_projections.py): one
matmul, and q and k are rotated by RoPE in one op (one C++ call inside decode_kernels(), decode_ops.rope); the
numbers are those of the split layout.

attention='performer'|'linformer' (linear_attention.py), 'lsh' (Reformer, lsh_attention.py) and 'routing'
(Routing Transformer, routing_attention.py) replace the
softmax-over-all-keys backends; they run on whole sequences, without a KV cache.

Usage:
    attn = Attention(cfg)
    y = attn(x, ctx, layer=0)        # ctx: the per-forward ForwardContext built by the Transformer
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.kernels import decode_ops
from lmstack.model.backends import BACKENDS
from lmstack.model.fused_projections import FusedLinear
from lmstack.model.linear import Linear, kernels_on
from lmstack.model.linear_attention import LINEAR_ATTENTION
from lmstack.model.lsh_attention import LSHAttention
from lmstack.model.norms import RMSNorm
from lmstack.model.positions import apply_rotary
from lmstack.model.routing_attention import RoutingAttention


def _rope_heads_second(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """decode_ops.rope for x (B, heads, T, D): the kernel takes (B, T, heads, D), as the fused layout holds it."""
    return decode_ops.rope(x.transpose(1, 2), cos, sin).transpose(1, 2)


# attention kinds other than softmax-over-all-keys: name -> module taking (q, k, v, causal)
ATTENTION_KINDS = {**LINEAR_ATTENTION, "lsh": LSHAttention, "routing": RoutingAttention}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Reformer's shared-QK uses the queries as keys, so an LSH model has no key projection.
        self.shared_qk = cfg.attention == "lsh" and cfg.lsh_shared_qk
        q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = self.k_proj = self.v_proj = self.qkv_proj = None
        if cfg.fused_projections:
            self.qkv_proj = FusedLinear(cfg.d_model, [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)],
                                        bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(cfg.d_model, q_rows, bias=cfg.qkv_bias)
            self.k_proj = None if self.shared_qk else Linear(cfg.d_model, kv_rows, bias=cfg.qkv_bias)
            self.v_proj = Linear(cfg.d_model, kv_rows, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_rows, cfg.d_model, bias=cfg.out_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm and not self.shared_qk else None
        self.backend = BACKENDS[cfg.attn_backend]
        self.backend_kwargs = (
            dict(block_q=cfg.attn_block_size, block_k=cfg.attn_block_size) if cfg.attn_backend == "blockwise" else {}
        )
        self.linear = ATTENTION_KINDS[cfg.attention](cfg) if cfg.attention != "softmax" else None
        self.kind = cfg.attention
        self.causal = cfg.causal
        self.softcap = cfg.attn_logit_softcap
        self.dropout = cfg.dropout
        # Gemma 2 scales by query_pre_attn_scalar**-0.5, which need not be head_dim (the paged engine reads this too)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        cache = ctx.cache
        if self.linear is not None and (cache is not None or ctx.has_batch_rules):
            raise LmstackError(f"attention={self.kind!r} runs without a KV cache, doc_ids or padding; "
                               "use attention='softmax' to decode with a cache")
        rotate_k = cache is None or cache.rotated_keys
        fused = self.qkv_proj  # (a submodule read goes through nn.Module.__getattr__: read it once)
        if fused is not None:
            q, k, v = self._fused_qkv(fused, x, ctx, rotate_k)
        else:
            q, k, v = self._split_qkv(x, ctx, rotate_k)
        if cache is not None:
            out = cache.attend(layer, q, k, v, self, ctx)
        elif self.linear is not None:
            out = self.linear(q, k, v, causal=self.causal)
        else:
            out = self.attend_all(q, k, v, ctx, layer)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _split_qkv(self, x, ctx, rotate_k: bool):
        """q (B, H, T, D), k and v (B, Hkv, T, D) from the three projections."""
        b, t, _ = x.shape
        # Head counts come from the projections' outputs, so a tensor-parallel shard holding
        # n_heads/tp heads runs unchanged.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = q if self.k_proj is None else self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = q if self.k_proj is None else self.k_norm(k)
        if ctx.cos_q is not None:
            rope = _rope_heads_second if kernels_on() else apply_rotary  # the same kernel as the fused layout
            q = rope(q, ctx.cos_q, ctx.sin_q)
            if self.k_proj is None:
                k = q  # shared-QK: the keys are the (rotated) queries
            elif rotate_k:
                k = rope(k, ctx.cos_q, ctx.sin_q)
        return q, k, v

    def _fused_qkv(self, qkv_proj, x, ctx, rotate_k: bool):
        """The same q, k, v from one matmul; q and k heads are normed and rotated together when both need it."""
        b, t, _ = x.shape
        h, hkv = self.n_heads, self.n_kv_heads
        qkv = qkv_proj(x).view(b, t, h + 2 * hkv, self.head_dim)
        qk, v = qkv[:, :, :h + hkv], qkv[:, :, h + hkv:]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])), dim=2)
        if ctx.cos_q is not None and rotate_k:
            # (T, 1, D) tables: one op for q and k heads; one C++ call in the engine's decode step
            rope = decode_ops.rope if kernels_on() else apply_rotary
            qk = rope(qk, ctx.cos_t, ctx.sin_t)
            q, k = qk[:, :, :h], qk[:, :, h:]
        elif ctx.cos_q is not None:
            q, k = apply_rotary(qk[:, :, :h], ctx.cos_t, ctx.sin_t), qk[:, :, h:]
        else:
            q, k = qk[:, :, :h], qk[:, :, h:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend_all(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        """The model's own attention of q over every given key: this layer's backend and the forward's mask."""
        return self.backend(q, k, v, ctx.mask(layer), self.scale, slopes=ctx.slopes, softcap=self.softcap,
                            dropout_p=self.dropout if self.training else 0.0, **self.backend_kwargs)
