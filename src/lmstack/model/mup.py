"""µP, the maximal update parametrisation (Yang et al. 2022, "Tensor Programs V"): hyperparameters tuned on a narrow
model transfer to wide ones.

Under the standard parametrisation every weight starts at the same std and Adam moves every entry by about lr, so a
hidden matrix's update changes its output by about lr * fan_in: the wider the model, the larger each step's change
to the activations, and the best LR shrinks with width. µP rescales three things by the width multiplier
m = d_model / mup_base_width so that each layer's activations move by an amount independent of width:

- init: hidden matrices (both dims grow with width: q/k/v/o, MLP, experts, MLM transform) use std / sqrt(m), i.e.
  std ∝ 1/sqrt(fan_in) relative to the base model; embeddings, the readout, norms and biases keep the base std;
- Adam LR: hidden matrices train at lr / m; embeddings, the readout, norms, biases and routers (one dim fixed:
  "vector-like") keep lr (train/optim/param_groups.py applies lr_scale());
- readout: the logits are multiplied by 1/m while the readout keeps the base init std (Tensor Programs V, Table 3:
  output weights with variance ∝ 1/fan_in², written as a multiplier; the `mup` package's MuReadout likewise). A tied
  readout is the embedding under the same multiplier (the package's MuSharedReadout);
- attention: scores are scaled by sqrt(base_head_dim)/head_dim, i.e. 1/d rather than 1/sqrt(d), equal to the
  standard 1/sqrt(d) at the base width. The base head_dim is head_dim / m: widening is assumed to widen the heads
  with n_heads held fixed (with head_dim held fixed instead, set d_model through head_dim and keep in mind that
  this still shrinks the scale by sqrt(m)).
The init is the standard one rescaled in place, so at the base width (m = 1) a µP model is the standard model
bit for bit, and the LR tuned there is the standard model's best LR.

Why the readout is not zero-initialised (the `mup` package's readout_zero_init, which this module used before):
with a zero readout no gradient reaches the trunk on the first step and the trunk's early gradients pass through
a readout only O(lr * t) large, so a 300-step run at the base width ends 0.22 nats worse (2.42 against 2.20, with
far more seed noise) and its best LR a grid step lower (benchmarks/mup_transfer.py). Zero init is an allowed µP
choice, not a required one: the logits at init already vanish as 1/sqrt(m) under the multiplier.

Adam's eps (1e-8) is left as is: the smallest hidden gradients (q_proj, whose scores carry the 1/d scale) shrink
about as m**-1.5, but at d_model 512 their 10% quantile is still 1.6e-7 in the first steps; far wider models
would want eps / m on hidden matrices.

Usage:
    cfg = ModelConfig(d_model=256, n_heads=4, parametrization="mup", mup_base_width=64)
    model = Transformer(cfg)                  # reset_parameters() rescales its init with mup_init_(model)
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
from lmstack.model.moe import MoE

# Parameters whose shape has one width-sized dim only (the vocab, positions, token types or experts on the other):
# µP's "vector-like" tensors, which keep the base init and the base LR.
_VECTOR_LIKE = re.compile(r"(?:^|\.)(?:tok_emb|pos_emb|type_emb|lm_head|router|knn_gate)\.")


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


def _initialised_weights(model: nn.Module):
    """(name, tensor) of every weight the standard init draws from N(0, std): Linear and Embedding weights and the
    stacked MoE experts (other tensors, e.g. a compressive memory's mean-pooling start, keep their own init)."""
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield prefix + "weight", module.weight
        elif isinstance(module, MoE):
            yield prefix + "w_in", module.w_in
            yield prefix + "w_out", module.w_out


@torch.no_grad()
def mup_init_(model: nn.Module) -> None:
    """Rescale a parametrization='mup' Transformer's standard init in place and set its attention scales (see the
    module doc). Called once by Transformer.reset_parameters right after the standard init (rescaling twice would
    apply the width factor twice); residual outputs keep the standard init's 1/sqrt(2 * n_layers) depth factor."""
    cfg = model.config
    mult = width_mult(cfg)
    # the standard init drew std at d_model; µP wants the base model's std (differs only for init='small')
    drawn = math.sqrt(2 / (5 * cfg.d_model)) if cfg.init == "small" else cfg.init_std
    to_base = base_std(cfg) / drawn
    seen = set()
    for name, p in _initialised_weights(model):
        if id(p) in seen or p.is_meta:  # a tied weight once; a meta model (load_model) has no values yet
            continue
        seen.add(id(p))
        p.mul_(to_base / math.sqrt(mult) if is_hidden_matrix(name, p.dim()) else to_base)
    for module in model.modules():
        if isinstance(module, Attention):
            module.scale = attention_scale(cfg)
