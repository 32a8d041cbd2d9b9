"""Fused RMSNorm and SwiGLU: one pass forward, one pass backward, only the inputs kept for backward.

Unfused, autograd keeps every intermediate of these element-wise chains: RMSNorm's fp32 copy, the
normalised x and the product with the weight; SwiGLU's silu(gate), its sigmoid and the product. Fused,
each is a torch.autograd.Function that saves only what the backward needs to recompute the rest:
    RMSNorm:  saves x and rstd (one float per row);    y = w * x * rstd
              dx = rstd * (dy*w - x * rstd^2 * mean(dy*w*x)),   dw = sum_rows(dy * x * rstd)
    SwiGLU:   saves gate and up;                       y = silu(gate) * up
              dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * silu(gate),   s = sigmoid(gate)

Kernels by device (picked by `kernel_for`):
- CUDA with Triton installed: the Triton kernels in fused_triton.py (one program per row / block).
- otherwise (CPU): the same Functions in plain torch ops, each chain compiled by torch.compile when a
  C++ compiler is present (inductor fuses the element-wise chain into one loop), else eager.
benchmarks/fused_kernels.py measures eager vs Function vs compiled on this CPU; the compiled Function
won (docs/techniques.md IV.11), so it is the CPU default.

Switch on with ModelConfig(fused_kernels=True): make_norm and MLP then use FusedRMSNorm / the fused
SwiGLU product. Numerics equal the unfused modules (tests/model/test_fused.py).

Usage:
    from lmstack.model.fused import rms_norm, swiglu
    y = rms_norm(x, weight, eps)          # same as RMSNorm
    h = swiglu(gate, up)                  # same as F.silu(gate) * up
"""
from __future__ import annotations

import functools
import os
import shutil

import torch
from torch import nn
import torch.nn.functional as F


# ---------------------------------------------------------------- plain torch math (CPU, and the reference)
def _rms_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return w * (xf * rstd).to(x.dtype), rstd


def _rms_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
    xf, gf = x.float(), (dy.float() * w.float())
    xhat = xf * rstd
    dx = rstd * (gf - xhat * (gf * xhat).mean(-1, keepdim=True))
    dw = (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(w.dtype)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    # aten's silu_backward is the dgate formula above in one native loop
    return torch.ops.aten.silu_backward(dy * up, gate), dy * F.silu(gate)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    """The math above compiled by torch.compile (inductor C++ on CPU), or eager when that cannot work."""
    fn = {"rms_fwd": _rms_fwd, "rms_bwd": _rms_bwd, "swiglu_fwd": _swiglu_fwd, "swiglu_bwd": _swiglu_bwd}[name]
    if os.environ.get("LMSTACK_FUSED_EAGER") or shutil.which(os.environ.get("CXX", "g++")) is None:
        return fn
    return torch.compile(fn, dynamic=True, fullgraph=True)


def kernel_for(t: torch.Tensor) -> str:
    """'triton' on CUDA with Triton installed, else 'torch'."""
    if t.is_cuda:
        try:
            # lazy: optional extra (triton)
            import triton  # noqa: F401
            return "triton"
        except ImportError:
            pass
    return "torch"


# ---------------------------------------------------------------- autograd Functions
class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, mode):
        if mode == "triton":
            # lazy: fused_triton imports triton at its top; only the CUDA triton path may import it
            from lmstack.model import fused_triton
            y, rstd = fused_triton.rms_norm_fwd(x, weight, eps)
        else:
            y, rstd = _compiled("rms_fwd")(x, weight, eps) if mode == "compiled" else _rms_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mode = mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if ctx.mode == "triton":
            # lazy: fused_triton imports triton at its top; only the CUDA triton path may import it
            from lmstack.model import fused_triton
            dx, dw = fused_triton.rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        elif ctx.mode == "compiled":
            dx, dw = _compiled("rms_bwd")(dy, x, weight, rstd)
        else:
            dx, dw = _rms_bwd(dy, x, weight, rstd)
        return dx, dw, None, None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, mode):
        if mode == "triton":
            # lazy: fused_triton imports triton at its top; only the CUDA triton path may import it
            from lmstack.model import fused_triton
            y = fused_triton.swiglu_fwd(gate, up)
        else:
            y = _compiled("swiglu_fwd")(gate, up) if mode == "compiled" else _swiglu_fwd(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.mode = mode
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        if ctx.mode == "triton":
            # lazy: fused_triton imports triton at its top; only the CUDA triton path may import it
            from lmstack.model import fused_triton
            dgate, dup = fused_triton.swiglu_bwd(dy.contiguous(), gate, up)
        elif ctx.mode == "compiled":
            dgate, dup = _compiled("swiglu_bwd")(dy, gate, up)
        else:
            dgate, dup = _swiglu_bwd(dy, gate, up)
        return dgate, dup, None


# CPU mode, picked by benchmarks/fused_kernels.py: the compiled Function was fastest forward+backward
# (RMSNorm 3.1x, SwiGLU 3.2x the unfused eager ops, ahead of the eager Function and of torch.compile on the
# unfused code), after a one-time compilation of about a minute on a shared 2-core machine. Without a
# C++ compiler _compiled() falls back to eager. LMSTACK_FUSED_EAGER=1 forces eager.
CPU_MODE = "compiled"


def _mode(t: torch.Tensor, mode: str | None) -> str:
    if mode is not None:
        return mode
    return "triton" if kernel_for(t) == "triton" else CPU_MODE


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, mode: str | None = None) -> torch.Tensor:
    """RMSNorm of x over its last dim, scaled by weight. mode: None (auto), 'eager', 'compiled' or 'triton'."""
    return _RMSNormFn.apply(x, weight, eps, _mode(x, mode))


def swiglu(gate: torch.Tensor, up: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """silu(gate) * up. mode: None (auto), 'eager', 'compiled' or 'triton'."""
    return _SwiGLUFn.apply(gate, up, _mode(gate, mode))


class FusedRMSNorm(nn.Module):
    """Drop-in for norms.RMSNorm (same parameter name and numerics) running the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
