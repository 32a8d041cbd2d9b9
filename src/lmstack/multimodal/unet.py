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

Stronger options (defaults keep the first arm's layout, so its saved directories load unchanged):
- cond="film": AdaGN (Dhariwal & Nichol 2021): the vector scales and shifts the second GroupNorm's output
  (zero-initialised: identity at the start). The default "add" puts a bias BEFORE that GroupNorm, which
  subtracts the part of it shared by a group's channels and can only shift, never scale, the features.
- pool="eos": the vector is the last real token's state (CLIP's own text embedding) instead of the token mean.
  A diagnosis on the benchmark's conditioning CLIP (300 ITC steps): 97% of the token mean's variance over the
  48 prompts is between colours and 1.6% between shapes (colour words span several subword tokens), so the
  mean barely tells the shapes apart; the EOS state of a CLIP trained 2000 steps puts 17% there.
- text_adapter: a trainable per-token LayerNorm + MLP (residual) on the frozen states, before the pooling and
  every cross-attention, so the denoiser can scale up the directions that separate the shape words.
- attn_levels: cross-attention after every ResBlock of those levels too (e.g. (1,) = 16x16 for a 32-px UNet).

Usage:
    from lmstack.multimodal.unet import UNet, UNetConfig
    unet = UNet(UNetConfig(image_size=32, channels=32, channel_mults=(1, 2, 2), text_dim=64))
    strong = UNetConfig(channels=32, cond="film", attn_levels=(1,), pool="eos", text_adapter=True)  # unet2
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
from lmstack.runtime.validation import check_choice, need

CONDS = ("add", "film")
POOLS = ("mean", "eos")


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
    """Heads of that cross-attention (and of attn_levels')."""
    attn_levels: tuple = ()
    """Levels (0 = full resolution, 1 = /2, ...) whose every ResBlock, down and up, is followed by
    cross-attention to the prompt's tokens too; () = only the middle (cross_attn)."""
    cond: str = "add"
    """How the time + text vector enters a ResBlock: add (a per-channel bias between the convs) or film (AdaGN:
    the second GroupNorm's output scaled by 1 + s and shifted by b, both from that vector; Dhariwal & Nichol)."""
    pool: str = "mean"
    """The text vector added to the time embedding: mean (of the real tokens) or eos (the last real token's
    state: what CLIP itself takes as the text embedding; with a causal tower it has read the whole prompt)."""
    text_adapter: bool = False
    """A trainable per-token adapter (LayerNorm, MLP, residual) on the frozen text tower's states, before the
    pooling and every cross-attention: it can rescale the directions that separate the words."""
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
        check_choice("unet.cond", self.cond, CONDS)
        check_choice("unet.pool", self.pool, POOLS)
        self.attn_levels = tuple(self.attn_levels)
        need(all(isinstance(v, int) and 0 <= v < len(self.channel_mults) for v in self.attn_levels),
             f"unet.attn_levels must be levels in 0..{len(self.channel_mults) - 1}, got {self.attn_levels!r}")
        for level in {len(self.channel_mults) - 1, *self.attn_levels}:
            width = self.channels * self.channel_mults[level]
            need(width % self.n_heads == 0 and width % self.groups == 0,
                 f"the width {width} of level {level} must be divisible by unet.n_heads and unet.groups")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        return from_dict(cls, data)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, the conditioning vector (add: + bias; film: scale-shift of the second GroupNorm),
    GroupNorm-SiLU-conv; a 1x1 conv on the skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, d_cond: int, groups: int, mode: str = "add"):
        super().__init__()
        self.mode = mode
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(d_cond, c_out * (2 if mode == "film" else 1))
        if mode == "film":  # starts as the identity modulation (scale 1, shift 0)
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        c = self.cond(F.silu(cond))[:, :, None, None]
        if self.mode == "film":
            scale, shift = c.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + c)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class TextAdapter(nn.Module):
    """Per-token LayerNorm - Linear - SiLU - Linear on the frozen text states, residual; the last layer starts at
    zero, so an untrained adapter passes the normalised states through."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        h = self.norm(text)
        return h + self.mlp(h)


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
        self.adapter = TextAdapter(cfg.text_dim) if cfg.text_adapter else None
        mode = cfg.cond

        def attn(width: int, level: int) -> nn.Module:
            if level in cfg.attn_levels:
                return CrossAttention(width, cfg.text_dim, cfg.n_heads, g)
            return nn.Identity()  # no parameters: the state dict of a UNet without attn_levels is unchanged

        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        widths = [c0 * m for m in cfg.channel_mults]
        self.down, self.downsample, skips, c = nn.ModuleList(), nn.ModuleList(), [], c0
        self.down_attn, self.up_attn = nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.n_res):
                blocks.append(ResBlock(c, width, d, g, mode))
                attns.append(attn(width, level))
                c = width
                skips.append(c)
            self.down.append(blocks)
            self.down_attn.append(attns)
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1 = ResBlock(c, c, d, g, mode)
        self.mid_attn = CrossAttention(c, cfg.text_dim, cfg.n_heads, g) if cfg.cross_attn else None
        self.mid2 = ResBlock(c, c, d, g, mode)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.n_res):
                blocks.append(ResBlock(c + skips.pop(), width, d, g, mode))
                attns.append(attn(width, level))
                c = width
            self.up.append(blocks)
            self.up_attn.append(attns)
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
        text_mask = text_mask.to(x.device)
        if self.adapter is not None:
            text = self.adapter(text)
        if cfg.pool == "eos":  # prompts are padded on the right: the last real token is EOS
            last = (text_mask.long().sum(1) - 1).clamp(min=0)
            pooled = text[torch.arange(len(text), device=x.device), last]
        else:
            keep = text_mask.to(x.dtype)[..., None]
            pooled = (text * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # mean of the real tokens only
        cond = self.time_mlp(timestep_embedding(t.to(x.device), cfg.channels)) + self.text_mlp(pooled)
        h = self.stem(x)
        hs = []
        for blocks, attns, down in zip(self.down, self.down_attn, self.downsample):
            for block, att in zip(blocks, attns):
                h = block(h, cond)
                if isinstance(att, CrossAttention):
                    h = att(h, text, text_mask)
                hs.append(h)
            h = down(h)
        h = self.mid1(h, cond)
        if self.mid_attn is not None:
            h = self.mid_attn(h, text, text_mask)
        h = self.mid2(h, cond)
        for blocks, attns, up in zip(self.up, self.up_attn, self.upsample):
            for block, att in zip(blocks, attns):
                h = block(torch.cat([h, hs.pop()], dim=1), cond)
                if isinstance(att, CrossAttention):
                    h = att(h, text, text_mask)
            h = up(h)
        return self.out(F.silu(self.out_norm(h)))
