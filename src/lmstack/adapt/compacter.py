"""Compacter (Mahabadi et al. 2021): bottleneck adapters whose projections are PHM layers.

A parameterised hypercomplex multiplication (PHM) layer builds its weight from Kronecker products,
    W = sum_{i=1..n} A_i (x) B_i,   A_i: n x n,   B_i = s_i t_i: (out/n) x (in/n) of rank r,
so an in -> out projection costs r * (in + out) numbers for the B_i instead of in * out. The "slow" rules A_i
are shared by every PHM layer of the adapter (all layers, down and up); the "fast" B_i are per layer. As in
Houlsby adapters (bottleneck.py), each block's attention and MLP outputs h become h + up(gelu(down(h))), here
with down = PHM(d_model -> bottleneck_dim) and up = PHM(bottleneck_dim -> d_model); up's s_i start at zero, so a
new adapter is an exact no-op. The adapters live in the same slots as Houlsby adapters, so set_adapter, disable
and delete treat them alike.

Trainable parameters (arithmetic), with n = phm_dim, r = phm_rank, d = d_model, b = bottleneck_dim, L layers:
    n^3 + 2 * L * (2 * r * (d + b) + d + b)          (count_compacter_params)
d_model and bottleneck_dim must be multiples of phm_dim.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="compacter", bottleneck_dim=32, phm_dim=4, phm_rank=1))
    lmstack finetune --method compacter --adapter.phm_dim 4 --data chat.jsonl --model DIR
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.adapt.bottleneck import _slot
from lmstack.adapt.hooks import ensure_sync
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError


class PHMRule(nn.Module):
    """The shared rules A_1..A_n (n x n each) of one Compacter adapter."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PHMLinear(nn.Module):
    """y = x W^T + bias with W = sum_i A_i (x) (s_i t_i); A comes from a shared PHMRule."""

    def __init__(self, rule: PHMRule, in_features: int, out_features: int, rank: int, zero: bool = False):
        super().__init__()
        n = rule.weight.shape[0]
        if in_features % n or out_features % n:
            raise LmstackError(f"compacter: phm_dim={n} must divide both {in_features} and {out_features}")
        object.__setattr__(self, "_rule", rule)  # shared, owned by the model: not a parameter of this layer
        self.in_features, self.out_features = in_features, out_features
        p, q = out_features // n, in_features // n
        # Var(W) = n Var(A) r Var(s) Var(t) = 1 / (3 in): the variance of nn.Linear's default init.
        self.s = nn.Parameter(torch.zeros(n, p, rank) if zero else torch.randn(n, p, rank) / math.sqrt(rank))
        self.t = nn.Parameter(torch.randn(n, rank, q) / math.sqrt(3 * in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self) -> torch.Tensor:
        a = self._rule.weight                      # (n, n, n)
        b = self.s @ self.t                        # (n, p, q)
        n, p, q = b.shape
        # kron(A_i, B_i)[x*p + y, u*q + v] = A_i[x, u] * B_i[y, v]
        return torch.einsum("ixu,iyv->xyuv", a, b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class CompacterAdapter(nn.Module):
    """x -> x + up(gelu(down(x))) with PHM projections; up starts at zero."""

    def __init__(self, rule: PHMRule, d_model: int, bottleneck_dim: int, rank: int):
        super().__init__()
        self.down = PHMLinear(rule, d_model, bottleneck_dim, rank)
        self.up = PHMLinear(rule, bottleneck_dim, d_model, rank, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


@register_method("compacter")
def add_compacter(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a Compacter adapter after every attention and every MLP of `model`, with one shared PHM rule."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmstackError("Compacter needs an lmstack Transformer (with .blocks)")
    d_model, n = model.config.d_model, cfg.phm_dim
    if d_model % n or cfg.bottleneck_dim % n:
        raise LmstackError(f"compacter: phm_dim={n} must divide d_model={d_model} and "
                           f"bottleneck_dim={cfg.bottleneck_dim}")
    ensure_sync(model)
    ref = next(model.parameters())
    rules = getattr(model, "compacter_rules", None)
    if rules is None:
        rules = nn.ModuleDict()
        model.compacter_rules = rules
    rules[adapter_name] = PHMRule(n).to(device=ref.device, dtype=ref.dtype)
    for block in blocks:
        for attr, sublayer in (("adapters_attn", block.attn), ("adapters_mlp", block.mlp)):
            slot = _slot(block, attr, sublayer)
            slot.adapters[adapter_name] = CompacterAdapter(rules[adapter_name], d_model, cfg.bottleneck_dim,
                                                           cfg.phm_rank).to(device=ref.device, dtype=ref.dtype)


def count_compacter_params(d_model: int, bottleneck_dim: int, n_layers: int, phm_dim: int, phm_rank: int) -> int:
    """Trainable parameters of one Compacter adapter (the formula in the module docstring)."""
    d, b, r = d_model, bottleneck_dim, phm_rank
    return phm_dim ** 3 + 2 * n_layers * (2 * r * (d + b) + d + b)
