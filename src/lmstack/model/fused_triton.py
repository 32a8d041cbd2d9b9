"""Triton kernels for the fused RMSNorm and SwiGLU of fused.py (CUDA only).

This module imports triton at the top, so only fused.py imports it, and only when a CUDA tensor meets
an installed Triton (fused.kernel_for). Math is the same as fused.py's plain-torch reference:
- RMSNorm: one program per row; forward stores y and rstd, backward recomputes x*rstd and writes dx
  plus a per-row dy*x*rstd that torch sums into dw (a (rows, D) fp32 buffer, simple and exact).
- SwiGLU: one program per BLOCK elements; backward recomputes sigmoid(gate) instead of storing it.
Accumulation is in fp32 whatever the input dtype.

Usage (through fused.py, not directly):
    y = fused.rms_norm(x_cuda, w, eps)      # picks these kernels on CUDA when triton is installed
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, stride, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # as the reference: normalise in fp32, round to the input dtype, then scale by the weight
    xhat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DWP, stride, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
    tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DWP + row * D + cols, dy * xhat, mask=mask)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    m, d = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    _rms_fwd_kernel[(m,)](x2, w, y, rstd, x2.stride(0), d, eps, BLOCK=triton.next_power_of_2(d))
    return y.view_as(x), rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
    x2, dy2 = _rows(x), _rows(dy)
    m, d = x2.shape
    dx = torch.empty_like(x2)
    dw_rows = torch.empty(m, d, dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(m,)](dy2, x2, w, rstd, dx, dw_rows, x2.stride(0), d, BLOCK=triton.next_power_of_2(d))
    return dx.view_as(x), dw_rows.sum(0).to(w.dtype)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, 1024),)](g, u, y, n, BLOCK=1024)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    g, u = gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, 1024),)](dy, g, u, dg, du, n, BLOCK=1024)
    return dg, du
