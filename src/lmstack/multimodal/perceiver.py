"""Perceiver (issue 24, IV.9; Jaegle et al. 2021): a small latent array cross-attends to a long input, then
latent self-attention blocks (the ONE lmstack Transformer, causal=False, head='none') think over the latents.

The input is either the picture's patches (`input="patches"`, like ViT's tokens) or its raw pixels
(`input="pixels"`, S*S inputs of 3 colours), each with Fourier features of its (x, y) position, since nothing
else tells the cross-attention where an input sits. Cost is linear in the input length M: the cross-attention
is N latents x M inputs, and everything after it sees N latents only, where a ViT's self-attention over M
tokens is quadratic. `n_cross > 1` re-reads the input between latent blocks (iterative cross-attention); with
`share_weights` every re-read after the first uses one shared set of weights, as the paper does.

FLOPs are counted by formula (`perceiver_flops`, `vit_flops`: 2 per multiply-add of every matmul, plus
attention's scores and weighted sums), so the benchmark can match a Perceiver and a ViT at equal cost.

Usage:
    from lmstack.multimodal.perceiver import Perceiver, PerceiverConfig, perceiver_flops
    cfg = PerceiverConfig(image_size=64, input="pixels", n_latents=16, d_model=64, n_outputs=14)
    model = Perceiver(cfg)
    logits = model(pixels)                 # (N, 14): a classification / attribute head over the mean latent
    latents = model.encode(pixels)         # (N, 16, 64)
    perceiver_flops(cfg)                   # forward FLOPs per image, by formula
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.model.counting import model_stats

INPUTS = ("patches", "pixels")


@dataclass
class PerceiverConfig:
    image_size: int = 32
    """Side of the square input picture in pixels."""
    input: Literal["patches", "pixels"] = "patches"
    """What the latents read: the picture's patches, or every raw pixel (a long input)."""
    patch_size: int = 4
    """Side of one patch (input='patches'); image_size must be a multiple of it."""
    n_fourier_bands: int = 8
    """Sine/cosine frequency bands per axis of the position features (plus the raw coordinate)."""
    n_latents: int = 16
    """Rows of the latent array: the cost after the cross-attention depends on this, not on the input."""
    d_model: int = 64
    """Width of the latents."""
    n_heads: int = 4
    """Heads of the latent self-attention."""
    cross_heads: int = 1
    """Heads of the cross-attention (the paper uses one)."""
    n_cross: int = 1
    """How many times the latents read the input; > 1 is iterative cross-attention."""
    self_layers: int = 2
    """Latent self-attention blocks after each cross-attention."""
    share_weights: bool = True
    """With n_cross > 1: every read after the first shares one set of weights (the first has its own)."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    n_outputs: int = 14
    """Width of the classification / attribute head on the mean latent."""

    def __post_init__(self):
        if self.input not in INPUTS:
            raise ConfigError(f"input={self.input!r}; allowed: {', '.join(INPUTS)}")
        for name in ("image_size", "patch_size", "n_latents", "d_model", "n_heads", "cross_heads", "n_cross",
                     "n_outputs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.self_layers < 0 or self.n_fourier_bands < 0 or self.d_ff < 0:
            raise ConfigError("self_layers, n_fourier_bands and d_ff must be >= 0")
        if self.input == "patches" and self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        for heads in (self.n_heads, self.cross_heads):
            if self.d_model % heads:
                raise ConfigError(f"d_model={self.d_model} must be divisible by the head count {heads}")

    @property
    def side(self) -> int:
        """Inputs per row of the input grid."""
        return self.image_size // self.patch_size if self.input == "patches" else self.image_size

    @property
    def n_inputs(self) -> int:
        return self.side ** 2

    @property
    def input_dim(self) -> int:
        content = 3 * self.patch_size ** 2 if self.input == "patches" else 3
        return content + 2 * (2 * self.n_fourier_bands + 1)

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    def latent_config(self) -> ModelConfig:
        """The latent self-attention stack: the one Transformer, bidirectional, no head, no positions."""
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_layers=self.self_layers, n_heads=self.n_heads,
                           d_ff=self.ff, max_seq_len=self.n_latents, norm="layernorm", position="none",
                           causal=False, head="none", mlp="gelu", mlp_bias=True, qkv_bias=True, out_bias=True)


def fourier_positions(side: int, n_bands: int) -> torch.Tensor:
    """(side*side, 2*(2*n_bands+1)) features of a side x side grid, row-major: per axis the coordinate in [-1, 1]
    and sin/cos(pi * f * coordinate) for f spaced linearly from 1 to side/2 (the grid's Nyquist frequency)."""
    coord = torch.linspace(-1, 1, side)
    freqs = torch.linspace(1.0, max(1.0, side / 2), n_bands) if n_bands else torch.zeros(0)
    ang = math.pi * coord[:, None] * freqs[None]  # (side, bands)
    per_axis = torch.cat([coord[:, None], ang.sin(), ang.cos()], dim=1)  # (side, 2B+1)
    yy = per_axis[:, None, :].expand(side, side, -1)
    xx = per_axis[None, :, :].expand(side, side, -1)
    return torch.cat([yy, xx], dim=-1).reshape(side * side, -1)


class CrossAttention(nn.Module):
    """Latents (queries) read the input (keys and values), pre-norm, then an MLP; both residual."""

    def __init__(self, d: int, input_dim: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(input_dim)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(input_dim, d), nn.Linear(input_dim, d)
        self.o = nn.Linear(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        b, n, d = latents.shape
        h = self.heads
        kv = self.norm_kv(inputs)
        q = self.q(self.norm_q(latents)).view(b, n, h, d // h).transpose(1, 2)
        k = self.k(kv).view(b, -1, h, d // h).transpose(1, 2)
        v = self.v(kv).view(b, -1, h, d // h).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        latents = latents + self.o(att)
        return latents + self.mlp(self.norm_mlp(latents))


class Perceiver(nn.Module):
    def __init__(self, cfg: PerceiverConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or PerceiverConfig()
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_model) * 0.02)
        self.register_buffer("positions", fourier_positions(cfg.side, cfg.n_fourier_bands), persistent=False)
        n_sets = min(cfg.n_cross, 2) if cfg.share_weights else cfg.n_cross
        self.cross = nn.ModuleList(CrossAttention(cfg.d_model, cfg.input_dim, cfg.cross_heads, cfg.ff)
                                   for _ in range(n_sets))
        self.blocks = nn.ModuleList(Transformer(cfg.latent_config()) for _ in range(n_sets)) \
            if cfg.self_layers else None
        self.head = nn.Linear(cfg.d_model, cfg.n_outputs)

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, M, input_dim): patch or pixel contents, row-major, with their position features."""
        cfg = self.config
        s = cfg.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise LmstackError(f"pixels must have shape (N, 3, {s}, {s}) (image_size={s}), got {shape}")
        p = cfg.patch_size if cfg.input == "patches" else 1
        # (N, 3*p*p, M): each column one patch (or pixel), read row-major like ViT's patch conv
        content = F.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)
        pos = self.positions.to(content.dtype).expand(content.shape[0], -1, -1)
        return torch.cat([content, pos], dim=-1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> latents (N, n_latents, d_model)."""
        cfg = self.config
        x = self.inputs(pixels)
        z = self.latents.expand(x.shape[0], -1, -1)
        for i in range(cfg.n_cross):
            k = min(i, len(self.cross) - 1)
            z = self.cross[k](z, x)
            if self.blocks is not None:
                z = self.blocks[k](inputs_embeds=z)
        return z

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> logits (N, n_outputs) from the mean latent."""
        return self.head(self.encode(pixels).mean(1))


def _cross_flops(cfg: PerceiverConfig) -> int:
    n, m, d, c = cfg.n_latents, cfg.n_inputs, cfg.d_model, cfg.input_dim
    return (2 * m * c * d * 2       # keys and values of every input
            + 2 * n * d * d * 2     # queries and the output projection
            + 2 * 2 * n * m * d     # scores and the weighted sum of values
            + 2 * n * d * cfg.ff * 2)  # the MLP


def perceiver_flops(cfg: PerceiverConfig) -> int:
    """Forward FLOPs per image, by formula: each cross-attention, each latent block (Kaplan's 2 per weight per
    latent plus 4 * N * d attention per layer, lmstack.model.counting), the head."""
    latent = 0
    if cfg.self_layers:
        latent = int(model_stats(cfg.latent_config(), context=cfg.n_latents).forward_flops_per_token) * cfg.n_latents
    return cfg.n_cross * (_cross_flops(cfg) + latent) + 2 * cfg.d_model * cfg.n_outputs


def vit_flops(vision_cfg, n_outputs: int = 0) -> int:
    """Forward FLOPs per image of lmstack.multimodal.vit.ViT (by formula): the patch projection, then every block
    over 1 + P tokens (2 per weight per token plus 4 * T * d attention per layer), and an optional linear head."""
    p, t = vision_cfg.n_patches, vision_cfg.n_patches + 1
    patch = 2 * p * 3 * vision_cfg.patch_size ** 2 * vision_cfg.d_model
    blocks = int(model_stats(vision_cfg.model_config(), context=t).forward_flops_per_token) * t
    return patch + blocks + 2 * vision_cfg.d_model * n_outputs


__all__ = ["PerceiverConfig", "Perceiver", "CrossAttention", "fourier_positions", "perceiver_flops", "vit_flops",
           "INPUTS"]
