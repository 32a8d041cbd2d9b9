"""Normalisation layers: LayerNorm and RMSNorm, chosen by name.

RMSNorm (Zhang & Sennrich 2019) drops LayerNorm's mean-centering and bias: x / rms(x) * weight.
It computes in fp32 whatever the input dtype, as the Llama reference does, so bf16 runs stay stable.

With cfg.fused_kernels, RMSNorm runs as fused.FusedRMSNorm (one kernel forward and backward).

Usage:
    norm = make_norm(cfg, cfg.d_model)
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.model.fused import FusedRMSNorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        if getattr(cfg, "fused_kernels", False):
            return FusedRMSNorm(dim, cfg.norm_eps)  # same parameters and numbers, one fused kernel
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
