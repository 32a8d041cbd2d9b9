"""A compact batch-1 decode step for llama-style configs (gpt-fast's idea: a short hot path).

On a CPU a 123M model's decode step is ~17 ms of weight streaming (GEMV) plus a few ms of per-op
overhead: the generic forward builds a context object, RoPE tables, masks, views, dtype casts and
~60 small ops per layer. This path runs the same math with the same weights in ~25 ops per layer:
fused F.rms_norm (bitwise equal to RMSNorm here), one RoPE table lookup per step, K/V written straight
into the paged pool, and SDPA over the sequence's contiguous slots with the query heads of each KV
head folded into rows (GQA without repeating K/V). Only the needed positions' logits are computed.
It also runs short windows of T tokens (speculative verification, a draft's catch-up).

It applies when the config is a plain pre-norm decoder (RMSNorm, RoPE, dense or gated MLP, no
ALiBi / windows / softcaps / QK-norm / sharing / MoE / parallel residuals) and the step is a single
sequence (at most SHORT_QUERY tokens) whose blocks are contiguous; anything else takes the generic path. tests/infer checks its
logits against the generic path.

Usage:
    fast = FastDecoder.build(model, paged_cache)     # None when the config is not supported
    logits = fast.step([token], pos, first_slot)     # (1, vocab); several tokens: a speculative window
    logits = fast.step(window, pos, first_slot, n_logits=len(window))   # logits of every window position
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.model.mlp import MLP
from lmstack.model.vocab import mask_padded_logits


def supported(model) -> bool:
    cfg = model.config
    return (cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.position == "rope" and not cfg.qk_norm
            and not cfg.parallel_residual and not cfg.sliding_window and not cfg.attn_logit_softcap
            and not cfg.final_logit_softcap and cfg.n_experts == 0 and not cfg.n_unique_layers
            and not cfg.type_vocab_size and not cfg.embedding_norm and cfg.head == "lm"
            and cfg.attention == "softmax" and not cfg.norm_plus_one and not cfg.scale_embeddings
            and not cfg.query_pre_attn_scalar and all(isinstance(b.mlp, MLP) for b in model.blocks))


class FastDecoder:
    def __init__(self, model, cache, share_weights: bool = False):
        self.model, self.cache = model, cache
        cfg = model.config
        self.eps = cfg.norm_eps
        self.d, self.d_ff = cfg.d_model, cfg.d_ff
        self.n_heads, self.hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.group, self.scale = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim ** -0.5
        self.dq, self.dkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.layers = []
        for b in model.blocks:
            a, m = b.attn, b.mlp
            # One GEMV for q/k/v and one for gate/up: fewer, larger matmuls and fewer ops (bitwise the same).
            qkv = _fuse([a.q_proj, a.k_proj, a.v_proj], share_weights)
            gated = m.gate_proj is not None
            gu = _fuse([m.gate_proj, m.up_proj], share_weights) if gated else (m.up_proj.weight, m.up_proj.bias)
            self.layers.append((b.attn_norm.weight, qkv, a.o_proj, b.mlp_norm.weight, gu, gated, m.down_proj, m.act))
        self.final = model.final_norm.weight
        self.head_w = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight

    @classmethod
    def build(cls, model, cache, share_weights: bool = False) -> "FastDecoder | None":
        return cls(model, cache, share_weights) if supported(model) else None

    def step(self, tokens: list[int], pos: int, first_slot: int, n_logits: int = 1) -> torch.Tensor:
        """Run T = len(tokens) tokens at positions pos..pos+T-1 of a sequence whose positions live in
        slots first_slot.. (contiguous); returns logits (n_logits, vocab) of the last n_logits positions.
        T = 1 is a decode step; T > 1 a speculative window or a short chunk."""
        m = self.model
        t = len(tokens)
        half, hd, dqk, nh, hkv = self.hd // 2, self.hd, self.dq + self.dkv, self.n_heads, self.hkv
        dev = self.head_w.device
        positions = torch.arange(pos, pos + t, device=dev)
        cos, sin = m.rope(positions)  # (T, hd), shared by every layer
        x = m.tok_emb.weight[tokens[0]:tokens[0] + 1] if t == 1 else m.tok_emb(torch.tensor(tokens, device=dev))
        # the tables are fp32; in the weights' dtype, as positions.apply_rope does, so a bf16/fp16 model's
        # queries stay in the dtype of its KV pool
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        slot = first_slot + pos
        end = slot + t
        mask = None
        if t > 1:  # causal inside the window; everything before it is visible
            keys = torch.arange(pos + t, device=dev)
            mask = (keys[None, :] <= positions[:, None]).repeat(self.group, 1)
        kpool, vpool = self.cache.k, self.cache.v
        for i, (n1, (w_qkv, b_qkv), o_proj, n2, (w_gu, b_gu), gated, down, act) in enumerate(self.layers):
            h = F.rms_norm(x, (self.d,), n1, self.eps)
            qkv = F.linear(h, w_qkv, b_qkv)
            qk = qkv[:, :dqk].view(t, -1, hd)  # q and k heads rotated together
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            kc, vc = kpool[i], vpool[i]
            kc[:, slot:end] = qk[:, nh:].transpose(0, 1)
            vc[:, slot:end] = qkv[:, dqk:].view(t, hkv, hd).transpose(0, 1)
            # (T, H, D) -> (Hkv, G*T, D): the query heads of a KV head become rows, so K/V are not repeated
            q = qk[:, :nh].view(t, hkv, self.group, hd).permute(1, 2, 0, 3).reshape(1, hkv, self.group * t, hd)
            att = F.scaled_dot_product_attention(q, kc[None, :, first_slot:end], vc[None, :, first_slot:end],
                                                 attn_mask=mask, scale=self.scale)
            att = att.view(hkv, self.group, t, hd).permute(2, 0, 1, 3).reshape(t, -1)
            x = x + o_proj(att)
            h = F.rms_norm(x, (self.d,), n2, self.eps)
            gu = F.linear(h, w_gu, b_gu)
            x = x + down(act(gu[:, :self.d_ff]) * gu[:, self.d_ff:] if gated else act(gu))
        logits = F.linear(F.rms_norm(x[t - n_logits:], (self.d,), self.final, self.eps), self.head_w)
        return mask_padded_logits(logits, self.model.config)  # the same padded-row rule as Transformer.head


def _fuse(linears, share: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input.

    share=True re-points each Linear's weight at its rows of the fused tensor, so no memory is
    duplicated (only for models the engine loaded itself: such weights can no longer be saved with
    safetensors, which refuses shared storage). Otherwise the fused copy costs extra memory."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                          for lin in linears])
    if share:
        row = 0
        for lin in linears:
            lin.weight.data = weight[row:row + lin.out_features]
            if bias is not None and lin.bias is not None:
                lin.bias.data = bias[row:row + lin.out_features]
            row += lin.out_features
    return weight, bias
