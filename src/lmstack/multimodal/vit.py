"""ViT: a picture cut into patches, each patch a token, read by the ONE lmstack Transformer as an encoder.

pixels (N, 3, S, S) -> Conv2d(kernel = stride = patch) -> P = (S/patch)^2 patch vectors, a learned class token in
front, learned position embeddings added, then Transformer(ModelConfig(causal=False, head="none",
position="none")) fed with `inputs_embeds`. HF CLIP's vision tower is this with `pre_norm` (a LayerNorm on the
embeddings before the blocks: the Transformer's embedding_norm), biased LayerNorms, quick_gelu and a LayerNorm on
the pooled vector only (`post_norm`, so `forward` returns the un-normed last hidden state, as HF does).

Usage:
    from lmstack.multimodal.vit import ViT, VisionConfig
    vit = ViT(VisionConfig(image_size=32, patch_size=8, d_model=64, n_layers=2, n_heads=4))
    tokens = vit(pixels)                 # (N, 1 + 16, 64): class token, then patches in row-major order
    penult = vit(pixels, layer=-2)       # HF hidden_states[-2]: what LLaVA feeds its projector
    vec = vit.pooled(pixels)             # (N, 64): post_norm(class token), or the mean of the patch tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmstack.config import from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.model import ModelConfig, Transformer
from lmstack.runtime.validation import check_choices, need


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (HF hidden_act='quick_gelu')."""
    return x * torch.sigmoid(1.702 * x)


@dataclass
class VisionConfig:
    image_size: int = 64
    """Side of the square input picture in pixels."""
    patch_size: int = 8
    """Side of one square patch; image_size must be a multiple of it."""
    d_model: int = 64
    """Width of the patch tokens and the residual stream."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    activation: Literal["gelu", "quick_gelu", "gelu_tanh", "relu"] = "quick_gelu"
    """MLP activation; quick_gelu is OpenAI CLIP's x * sigmoid(1.702 x)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Norm layers (CLIP: LayerNorm with bias)."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    pool: Literal["cls", "mean"] = "cls"
    """pooled(): the class token (CLIP) or the mean of the patch tokens."""
    pre_norm: bool = True
    """A norm on the embeddings before the first block (CLIP's pre_layrnorm)."""
    patch_bias: bool = False
    """Bias on the patch projection (CLIP has none)."""
    dropout: float = 0.0
    """Dropout inside the blocks."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.image_size % self.patch_size == 0,
             f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size} "
             f"(image_size % patch_size = {self.image_size % self.patch_size})")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        need(self.d_ff >= 0, f"d_ff must be >= 0 (0 = 4 * d_model), got {self.d_ff}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def model_config(self) -> ModelConfig:
        """The encoder's ModelConfig: bidirectional, no head, no positions of its own (ours are added here)."""
        # quick_gelu is not a ModelConfig mlp kind: the blocks are built with gelu and their activation swapped
        mlp = "gelu" if self.activation == "quick_gelu" else self.activation
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=self.d_ff or 4 * self.d_model, max_seq_len=1 + self.n_patches, norm=self.norm,
                           norm_eps=self.norm_eps, norm_bias=True, position="none", causal=False, head="none",
                           qkv_bias=True, out_bias=True, mlp=mlp, mlp_bias=True, embedding_norm=self.pre_norm,
                           dropout=self.dropout, init="normal")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        return from_dict(cls, data)


def swap_activation(model: Transformer, activation: str) -> None:
    """Give every block's MLP the activation `activation` where ModelConfig has no such kind (quick_gelu)."""
    if activation == "quick_gelu":
        for block in model.blocks:
            block.mlp.act = quick_gelu


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.pos_emb = nn.Parameter(torch.randn(1 + cfg.n_patches, d) * 0.02)
        self.encoder = Transformer(cfg.model_config())
        swap_activation(self.encoder, cfg.activation)
        # the Transformer always owns a token table; a ViT feeds inputs_embeds and never reads it: zero, frozen
        nn.init.zeros_(self.encoder.tok_emb.weight)
        self.encoder.tok_emb.weight.requires_grad_(False)
        # HF CLIP norms the pooled vector only; the Transformer's final norm (on every token) is replaced by it
        self.post_norm = self.encoder.final_norm
        self.encoder.final_norm = None

    @property
    def n_patches(self) -> int:
        return self.config.n_patches

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.config.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise LmstackError(f"pixels must have shape (N, 3, {s}, {s}) (image_size={s}), got {shape}; "
                               "make them with lmstack.multimodal.images.to_pixels(images, size)")
        if not pixels.is_floating_point():
            raise LmstackError(f"pixels must be floats in [-1, 1], got dtype {pixels.dtype}")

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 1 + P, d): class token and patch vectors with positions, before the blocks."""
        self.check_pixels(pixels)
        w = self.patch_embed.weight
        x = self.patch_embed(pixels.to(w.dtype)).flatten(2).transpose(1, 2)  # (N, P, d), patches row-major
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_emb.to(x.dtype)

    def forward(self, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(N, 3, S, S) -> tokens (N, 1 + P, d). layer indexes HF's hidden_states (n_layers + 1 of them: the
        normed embeddings, then each block's output): -1 the last block's output, -2 the one before, 0 the input."""
        n = self.config.n_layers
        if not -(n + 1) <= layer <= n:
            raise LmstackError(f"layer={layer} must be in -{n + 1}..{n} (hidden states of {n} blocks + embeddings)")
        index = layer % (n + 1)
        x = self.embed(pixels)
        if index == n:
            return self.encoder(inputs_embeds=x)
        seen: dict[int, torch.Tensor] = {}

        def grab(i: int, h: torch.Tensor) -> torch.Tensor:
            seen[i] = h  # the residual stream entering block i = hidden_states[i]
            return h

        self.encoder(inputs_embeds=x, layer_hook=grab)
        return seen[index]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, d): the normed class token (pool='cls') or mean of the patch tokens (pool='mean')."""
        tokens = self(pixels)
        v = tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.post_norm(v)
