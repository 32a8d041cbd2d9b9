"""BLIP-2's Q-Former: a fixed number of learned queries that read a picture's patch tokens, then a linear map
into the LM's width, so the LM sees n_queries image tokens whatever the number of patches.

The queries' self-attention and feed-forward are the ONE lmstack Transformer used as an encoder
(ModelConfig(causal=False, head="none", position="none"), fed with inputs_embeds); the cross-attention to the
patches sits before every `cross_every`-th block through Transformer.forward's layer_hook, as in BLIP-2 (which
cross-attends every other block). BLIP-2 first pre-trains the Q-Former with its own ITC/ITM/ITG losses; here it
is trained end to end with the LM loss only (multimodal/vlm_train.py).

Usage:
    qf = QFormer(d_vision=64, d_lm=96, n_queries=16, d_model=64, n_layers=2, n_heads=4)
    tokens = qf(patches)                        # (N, P, 64) -> (N, 16, 96)
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.multimodal.fusion import CrossAttention


class QFormer(nn.Module):
    def __init__(self, d_vision: int, d_lm: int, n_queries: int = 16, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, cross_every: int = 1):
        super().__init__()
        if n_queries < 1:
            raise LmstackError(f"n_queries must be >= 1, got {n_queries}")
        if cross_every < 1:
            raise LmstackError(f"cross_every must be >= 1, got {cross_every}")
        self.n_queries, self.cross_every = n_queries, cross_every
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        self.encoder = Transformer(ModelConfig(vocab_size=1, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                               max_seq_len=n_queries, position="none", causal=False, head="none",
                                               norm="layernorm", mlp="gelu", init="normal"))
        n_cross = len(range(0, n_layers, cross_every))
        self.cross_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_cross))
        self.cross = nn.ModuleList(CrossAttention(d_model, d_vision, n_heads) for _ in range(n_cross))
        self.out_proj = nn.Linear(d_model, d_lm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, d_vision) patch tokens -> (N, n_queries, d_lm)."""
        if features.dim() != 3:
            raise LmstackError(f"Q-Former input must be (N, patches, d_vision), got {tuple(features.shape)}")

        def read_patches(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer % self.cross_every:
                return x
            i = layer // self.cross_every
            return x + self.cross[i](self.cross_norms[i](x), features)

        q = self.queries.to(features.dtype).expand(features.shape[0], -1, -1)
        return self.out_proj(self.encoder(inputs_embeds=q, layer_hook=read_patches))


__all__ = ["QFormer"]
