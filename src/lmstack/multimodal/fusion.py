"""Ways to join a vision encoder's patch tokens to a language model (issue 24 §2, XII.3).

- `Projector`: LLaVA's 2-layer MLP (Linear, GELU, Linear) from the vision width to the LM width; its outputs take
  the place of the `<image>` tokens in the LM's input (multimodal/vlm.py splices them).
- `CrossAttention`: queries from a stream, keys and values from the image tokens (their own width), no mask: every
  position sees every image token. Shared by Flamingo's layers here and the Q-Former (qformer.py).
- `GatedCrossAttention`: Flamingo's block inserted before an LM block: x + tanh(a) * xattn(norm(x), image), then
  x + tanh(b) * ffw(norm(x)). The gates a and b start at 0, so at initialisation the LM computes exactly what it
  did alone: a frozen, pretrained LM is not disturbed before training has learned to use the picture.
- `XAttnHook`: the callable `Transformer.forward(layer_hook=...)` takes; it runs the gated layer chosen for that
  LM block on the residual stream. The image is bound per call (`bind`), so a KV-cached decode step, which feeds
  one new token, still reads the whole picture (cross-attention has no positions, so nothing else changes).
One picture per sequence for the cross-attention path: row b reads image b (Flamingo's per-image masking across
several interleaved pictures is not built).

Usage:
    proj = Projector(d_vision=64, d_lm=96)
    tokens = proj(patches)                                   # (N, P, 64) -> (N, P, 96)
    layers = nn.ModuleList(GatedCrossAttention(96, 64, n_heads=4) for _ in range(2))
    hook = XAttnHook(layers, every=1).bind(patches)          # patches (B, P, 64), row b for sequence b
    logits = lm(ids, layer_hook=hook)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError


class Projector(nn.Module):
    """LLaVA-1.5's multi_modal_projector: linear_1 (d_vision -> hidden), GELU, linear_2 (hidden -> d_lm)."""

    def __init__(self, d_vision: int, d_lm: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or d_lm
        self.linear_1 = nn.Linear(d_vision, hidden)
        self.linear_2 = nn.Linear(hidden, d_lm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(features)))


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, T, d) over context (B, M, d_ctx), unmasked; returns (B, T, d)."""

    def __init__(self, d: int, d_ctx: int, n_heads: int):
        super().__init__()
        if d % n_heads:
            raise LmstackError(f"cross-attention width {d} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d_ctx, d, bias=False)
        self.v_proj = nn.Linear(d_ctx, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context.shape[0] != x.shape[0]:
            raise LmstackError(f"cross-attention over {context.shape[0]} images for {x.shape[0]} sequences; "
                               "give one image per sequence")
        b, t, d = x.shape
        h = self.n_heads

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, -1, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(context)),
                                             heads(self.v_proj(context)))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: tanh-gated cross-attention and feed-forward, gates initialised to 0."""

    def __init__(self, d_lm: int, d_ctx: int, n_heads: int, ff_mult: int = 4):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_lm)
        self.attn = CrossAttention(d_lm, d_ctx, n_heads)
        self.ff_norm = nn.LayerNorm(d_lm)
        self.ff = nn.Sequential(nn.Linear(d_lm, ff_mult * d_lm), nn.GELU(), nn.Linear(ff_mult * d_lm, d_lm))
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(x), context)
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))


def xattn_layers(n_lm_layers: int, every: int) -> list[int]:
    """The LM blocks that get a gated cross-attention layer in front: 0, every, 2 * every, ..."""
    if every < 1:
        raise LmstackError(f"xattn_every must be >= 1, got {every}")
    return list(range(0, n_lm_layers, every))


class XAttnHook:
    """layer_hook for Transformer.forward: before each chosen LM block, the gated layer reads the bound image."""

    def __init__(self, layers: nn.ModuleList, every: int, context: torch.Tensor | None = None):
        self.layers, self.every, self.context = layers, every, context

    def bind(self, context: torch.Tensor) -> "XAttnHook":
        """A hook reading `context` (B, M, d_ctx); the layers are shared, not copied."""
        return XAttnHook(self.layers, self.every, context)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer % self.every:
            return x
        if self.context is None:
            raise LmstackError("a cross-attention VLM needs its image: bind one (pixels=... or image_embeds=...)")
        return self.layers[layer // self.every](x, self.context.to(x.dtype))


__all__ = ["Projector", "CrossAttention", "GatedCrossAttention", "XAttnHook", "xattn_layers"]
