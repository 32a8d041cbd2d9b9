"""Normalisation layers: LayerNorm and RMSNorm, chosen by name.

RMSNorm (Zhang & Sennrich 2019) drops LayerNorm's mean-centering and bias: x / rms(x) * weight.
It computes in fp32 whatever the input dtype, as the Llama reference does, so bf16 runs stay stable;
an fp32 input goes through torch's fused rms_norm op, bitwise equal to the written-out form and one op
instead of eight (it matters when decoding one token at a time). Inside decode_kernels() (the engine's steps) it
is one C++ call (lmstack.kernels.decode_ops.rms_norm), the same math within fp32 rounding.
Gemma's variant (cfg.norm_plus_one) scales by (1 + weight) in fp32, with the weight initialised to 0.

With cfg.fused_kernels, RMSNorm runs as fused.FusedRMSNorm (one kernel forward and backward).

Usage:
    norm = make_norm(cfg, cfg.d_model)
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.kernels import decode_ops
from lmstack.model.fused import FusedRMSNorm
from lmstack.model.linear import kernels_on


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        # plus_one stores the scale as an offset from 1, so its "identity" init is zeros
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # (read once: a parameter lookup goes through nn.Module.__getattr__)
        if x.dtype == torch.float32 and w.dtype == torch.float32 and not self.plus_one:
            if kernels_on():  # the engine's decode step: one C++ pass instead of torch's ~6 ops (decode_ops.py)
                return decode_ops.rms_norm(x, w, self.eps)
            return torch.rms_norm(x, w.shape, w, self.eps)  # F.rms_norm's op, without its Python wrapper
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # Gemma multiplies in fp32 before casting back (Llama casts first)
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        if getattr(cfg, "fused_kernels", False):
            return FusedRMSNorm(dim, cfg.norm_eps)  # same parameters and numbers, one fused kernel
        return RMSNorm(dim, cfg.norm_eps, plus_one=getattr(cfg, "norm_plus_one", False))
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
