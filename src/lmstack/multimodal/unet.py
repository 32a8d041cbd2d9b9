"""A small DDPM-style conv UNet denoiser (Ho et al. 2020; Nichol & Dhariwal 2021), the alternative to the DiT
(multimodal/dit.py) behind ImageGenerator: same call, eps = unet(x_t, t, text, text_mask).

Why beside the DiT: convolutions are a locality prior. A tiny DiT trained for a few minutes learned the prompt's
colour but drew scattered patch-sized blocks, never one coherent shape; DDPM's own denoiser was a UNet.

Layout: a 3x3 stem conv, then per resolution (image_size, /2, /4 for channel_mults (1, 2, 2)) `n_res`
ResBlocks (GroupNorm, SiLU, 3x3 conv, the conditioning vector added between the two convs, dropout-free) and a
stride-2 downsampling conv; a middle of ResBlock - cross-attention - ResBlock at the lowest resolution; the
mirror path up, each ResBlock reading the matching down block's output (skip connection), a stride-2
transposed conv between resolutions; GroupNorm, SiLU and a ZERO-initialised 3x3 output conv, so an untrained
UNet predicts zero noise (as the DiT's zero-init output layer does). One ResBlock per resolution and way (not
DDPM's 2-3) keeps a training step about as cheap as the benchmark's DiT on one CPU thread.

Conditioning, from the same frozen CLIP text tower's per-token states (B, L, text_dim) and mask (B, L):
- the pooled text vector (mean of the unmasked tokens) through an MLP, added to the sinusoidal timestep
  embedding: that sum reaches every ResBlock;
- cross-attention at the lowest resolution (`cross_attn`): every pixel of the middle feature map attends to the
  prompt's tokens, padding masked out.
The null condition for classifier-free guidance is the empty prompt "" through the same tower (ImageGenerator
builds it), exactly as for the DiT.

Usage:
    from lmstack.multimodal.unet import UNet, UNetConfig
    unet = UNet(UNetConfig(image_size=32, channels=32, channel_mults=(1, 2, 2), text_dim=64))
    eps = unet(x_t, t, text, text_mask)     # (B,3,32,32), (B,), (B,L,64), (B,L) bool -> (B,3,32,32)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.multimodal.diffusion import timestep_embedding
from lmstack.runtime.validation import need


@dataclass
class UNetConfig:
    image_size: int = 32
    """Side of the (square) pictures; divisible by 2^(len(channel_mults) - 1)."""
    channels: int = 32
    """Channels at the full resolution (a multiple of groups)."""
    channel_mults: tuple = (1, 2, 2)
    """Channel multiplier per resolution, full resolution first; each further entry halves the side."""
    n_res: int = 1
    """ResBlocks per resolution on each way (down and up); each up block reads one down block's output."""
    groups: int = 8
    """GroupNorm groups."""
    cross_attn: bool = True
    """Cross-attention to the prompt's tokens at the lowest resolution (else only the pooled text vector)."""
    n_heads: int = 4
    """Heads of that cross-attention."""
    text_dim: int = 64
    """Width of the text condition (the CLIP text tower's d_model)."""
    max_text_len: int = 16
    """Most text tokens the condition may have (BOS and EOS included)."""

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        for name in ("image_size", "channels", "n_res", "groups", "n_heads", "text_dim", "max_text_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"unet.{name} must be a positive integer, got {value!r}")
        need(len(self.channel_mults) >= 1 and all(isinstance(m, int) and m > 0 for m in self.channel_mults),
             f"unet.channel_mults must be positive integers, got {self.channel_mults!r}")
        need(self.image_size % 2 ** (len(self.channel_mults) - 1) == 0,
             f"unet.image_size={self.image_size} must be divisible by 2^{len(self.channel_mults) - 1}")
        need(self.channels % self.groups == 0,
             f"unet.channels={self.channels} must be a multiple of unet.groups={self.groups}")
        low = self.channels * self.channel_mults[-1]
        need(low % self.n_heads == 0, f"the lowest-resolution width {low} must be divisible by unet.n_heads")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        return from_dict(cls, data)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + the conditioning vector, GroupNorm-SiLU-conv; a 1x1 conv on the skip when widths
    differ."""

    def __init__(self, c_in: int, c_out: int, d_cond: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(d_cond, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond(F.silu(cond))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Pixels (queries) attend to the prompt's tokens (keys/values); padding tokens masked out; residual."""

    def __init__(self, channels: int, text_dim: int, n_heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = nn.MultiheadAttention(channels, n_heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        pad = None if text_mask is None else ~text_mask.bool()
        out, _ = self.attn(q, text, text, key_padding_mask=pad, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        c0, g = cfg.channels, cfg.groups
        d = 4 * c0  # width of the timestep + text conditioning vector
        self.time_mlp = nn.Sequential(nn.Linear(c0, d), nn.SiLU(), nn.Linear(d, d))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        widths = [c0 * m for m in cfg.channel_mults]
        self.down, self.downsample, skips, c = nn.ModuleList(), nn.ModuleList(), [], c0
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.n_res):
                blocks.append(ResBlock(c, width, d, g))
                c = width
                skips.append(c)
            self.down.append(blocks)
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1 = ResBlock(c, c, d, g)
        self.mid_attn = CrossAttention(c, cfg.text_dim, cfg.n_heads, g) if cfg.cross_attn else None
        self.mid2 = ResBlock(c, c, d, g)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.n_res):
                blocks.append(ResBlock(c + skips.pop(), width, d, g))
                c = width
            self.up.append(blocks)
            # a transposed conv doubles the side at the low resolution's cost (4x cheaper than upsample + conv)
            self.upsample.append(nn.ConvTranspose2d(c, widths[level - 1], 4, stride=2, padding=1) if level
                                 else nn.Identity())
            c = widths[level - 1] if level else c
        self.out_norm = nn.GroupNorm(g, c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # the untrained denoiser predicts zero noise
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for x_t (B, 3, S, S) at steps t (B,), given text (B, L, text_dim), mask (B, L)."""
        cfg = self.config
        s = cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise LmstackError(f"UNet input must have shape (B, 3, {s}, {s}), got {tuple(x.shape)}")
        if text.dim() != 3 or text.shape[0] != x.shape[0] or text.shape[2] != cfg.text_dim:
            raise LmstackError(f"text condition must have shape ({x.shape[0]}, L, {cfg.text_dim}), "
                               f"got {tuple(text.shape)}")
        if text.shape[1] > cfg.max_text_len:
            raise LmstackError(f"text condition of {text.shape[1]} tokens is longer than "
                               f"unet.max_text_len={cfg.max_text_len}")
        text = text.to(x.dtype)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        keep = text_mask.to(x.device, x.dtype)[..., None]
        pooled = (text * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # mean of the real tokens only
        cond = self.time_mlp(timestep_embedding(t.to(x.device), cfg.channels)) + self.text_mlp(pooled)
        h = self.stem(x)
        hs = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, cond)
                hs.append(h)
            h = down(h)
        h = self.mid1(h, cond)
        if self.mid_attn is not None:
            h = self.mid_attn(h, text, text_mask.to(x.device))
        h = self.mid2(h, cond)
        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), cond)
            h = up(h)
        return self.out(F.silu(self.out_norm(h)))
