"""µP, the maximal update parametrisation (Yang et al. 2022, "Tensor Programs V"): hyperparameters tuned on a narrow
model transfer to wide ones.

Under the standard parametrisation every weight starts at the same std and Adam moves every entry by about lr, so a
hidden matrix's update changes its output by about lr * fan_in: the wider the model, the larger each step's change
to the activations, and the best LR shrinks with width. µP rescales three things by the width multiplier
m = d_model / mup_base_width so that each layer's activations move by an amount independent of width:

- init: hidden matrices (both dims grow with width: q/k/v/o, MLP, experts, MLM transform) use std / sqrt(m), i.e.
  std ∝ 1/sqrt(fan_in) relative to the base model; embeddings, norms and biases keep their std;
- Adam LR: hidden matrices train at lr / m; embeddings, the readout, norms, biases and routers (one dim fixed:
  "vector-like") keep lr (train/optim/param_groups.py applies lr_scale());
- readout: the logits are multiplied by 1/m, and an untied readout starts at zero (the `mup` package's
  readout_zero_init; a tied readout is the embedding and keeps its init);
- attention: scores are scaled by sqrt(base_head_dim)/head_dim, i.e. 1/d rather than 1/sqrt(d), equal to the
  standard 1/sqrt(d) at the base width. The base head_dim is head_dim / m: widening is assumed to widen the heads
  with n_heads held fixed (with head_dim held fixed instead, set d_model through head_dim and keep in mind that
  this still shrinks the scale by sqrt(m)).
At the base width (m = 1) a µP model is the standard one except for the zero readout.

Usage:
    cfg = ModelConfig(d_model=256, n_heads=4, parametrization="mup", mup_base_width=64)
    model = Transformer(cfg)                  # reset_parameters() calls mup_init_(model)
    groups = param_groups(model, opt_cfg, lr) # hidden matrices get lr * 64/256
    lr_scale(cfg, "blocks.0.attn.q_proj.weight", 2)   # -> 0.25
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from lmstack.model.attention import Attention
from lmstack.model.config import ModelConfig

# Parameters whose shape has one width-sized dim only (the vocab, positions, token types or experts on the other):
# µP's "vector-like" tensors, which keep the base init and the base LR.
_VECTOR_LIKE = re.compile(r"(?:^|\.)(?:tok_emb|pos_emb|type_emb|lm_head|router|knn_gate)\.")
_RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "w_out")


def width_mult(cfg: ModelConfig) -> float:
    """m = d_model / mup_base_width (1.0 under the standard parametrisation)."""
    return cfg.d_model / cfg.mup_base_width if cfg.parametrization == "mup" else 1.0


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """Whether parameter `name` (any wrapper prefix) is a hidden matrix: >= 2-D and both fans grow with width."""
    return ndim >= 2 and not _VECTOR_LIKE.search(name)


def lr_scale(cfg: ModelConfig | None, name: str, ndim: int) -> float:
    """The Adam LR multiplier µP gives parameter `name`: 1/m for hidden matrices, 1 otherwise (and for standard)."""
    if cfg is None or cfg.parametrization != "mup" or not is_hidden_matrix(name, ndim):
        return 1.0
    return 1.0 / width_mult(cfg)


def output_mult(cfg: ModelConfig) -> float:
    """The readout's logit multiplier, 1/m."""
    return 1.0 / width_mult(cfg)


def attention_scale(cfg: ModelConfig) -> float:
    """Attention's score scale under µP: the standard (query_pre_attn_scalar or head_dim)**-0.5 times 1/sqrt(m),
    which is sqrt(base_head_dim)/head_dim when head_dim grows with width."""
    return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5 / math.sqrt(width_mult(cfg))


def base_std(cfg: ModelConfig) -> float:
    """The init std of the base-width model (init='small' depends on d_model, so it is taken at the base width)."""
    return math.sqrt(2 / (5 * cfg.mup_base_width)) if cfg.init == "small" else cfg.init_std


@torch.no_grad()
def mup_init_(model: nn.Module) -> None:
    """Re-initialise a parametrization='mup' Transformer in place and set its attention scales (see the module doc).

    Called by Transformer.reset_parameters after the standard init, so biases and norms stay as that left them."""
    cfg = model.config
    mult = width_mult(cfg)
    std = base_std(cfg)
    depth = math.sqrt(2 * cfg.n_layers) if cfg.init in ("gpt2", "small") else 1.0
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.dim() < 2:
            continue
        if name.startswith("lm_head."):
            nn.init.zeros_(p)  # zero readout: the logits start at 0 at every width
        elif is_hidden_matrix(name, p.dim()):
            # residual outputs keep GPT-2's depth scaling on top of the width scaling
            scale = depth if name.endswith(_RESIDUAL_OUT) else 1.0
            nn.init.normal_(p, 0.0, std / math.sqrt(mult) / scale)
        else:
            nn.init.normal_(p, 0.0, std)
    for module in model.modules():
        if isinstance(module, Attention):
            module.scale = attention_scale(cfg)
