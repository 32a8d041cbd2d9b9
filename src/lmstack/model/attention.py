"""Multi-head attention with grouped K/V heads (MHA, GQA, MQA), optional QK-norm, RoPE or ALiBi,
and any backend from backends.py.

GQA (Ainslie et al. 2023) shares each K/V head among n_heads/n_kv_heads query heads, which shrinks
the KV cache by that factor; n_kv_heads = 1 is MQA (Shazeer 2019).

A cache object with an `attend(layer, q, k, v, attention_module)` method (the inference engine's
paged cache) takes over the K/V write and the attention for the layer; KVCache/SinkCache use update().

attention='performer'|'linformer' (linear_attention.py) and 'lsh' (Reformer, lsh_attention.py) replace the
softmax-over-all-keys backends; they run on whole sequences, without a KV cache.

Usage:
    attn = Attention(cfg)
    y = attn(x, ctx, layer=0)        # ctx: the per-forward ForwardContext built by the Transformer
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.backends import BACKENDS
from lmstack.model.linear_attention import LINEAR_ATTENTION
from lmstack.model.lsh_attention import LSHAttention
from lmstack.model.norms import RMSNorm
from lmstack.model.positions import apply_rotary

# attention kinds other than softmax-over-all-keys: name -> module taking (q, k, v, causal)
ATTENTION_KINDS = {**LINEAR_ATTENTION, "lsh": LSHAttention}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        # Reformer's shared-QK uses the queries as keys, so an LSH model has no key projection.
        shared_qk = cfg.attention == "lsh" and cfg.lsh_shared_qk
        self.k_proj = None if shared_qk else nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm and not shared_qk else None
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
        # Head counts come from the projections' outputs, so a tensor-parallel shard holding
        # n_heads/tp heads runs unchanged.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = q if self.k_proj is None else self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = q if self.k_proj is None else self.k_norm(k)
        cache = ctx.cache
        if self.linear is not None and (cache is not None or ctx.has_batch_rules):
            raise LmstackError(f"attention={self.kind!r} runs without a KV cache, doc_ids or padding; "
                               "use attention='softmax' to decode with a cache")
        if ctx.cos_q is not None:
            q = apply_rotary(q, ctx.cos_q, ctx.sin_q)
            if self.k_proj is None:
                k = q  # shared-QK: the keys are the (rotated) queries
            elif cache is None or cache.rotated_keys:
                k = apply_rotary(k, ctx.cos_q, ctx.sin_q)
        if cache is not None and hasattr(cache, "attend"):
            # A paged cache (lmstack.infer) owns the K/V write and the attention: its batch is many
            # sequences flattened into one row, each with its own block table.
            out = cache.attend(layer, q, k, v, self)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if cache is not None:
            k, v = cache.update(layer, k, v)
            if ctx.cos_q is not None and not cache.rotated_keys:
                k = apply_rotary(k, *ctx.rope_k())
        if self.linear is not None:
            out = self.linear(q, k, v, causal=self.causal)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        out = self.backend(q, k, v, ctx.mask(layer), self.scale, slopes=ctx.slopes, softcap=self.softcap,
                           dropout_p=self.dropout if self.training else 0.0, **self.backend_kwargs)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
