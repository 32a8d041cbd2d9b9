"""skinny_linear: F.linear for decode-sized fp32 inputs (a few rows) through the C++ kernel in skinny_gemm.cpp.

At decode time x has 1..MAX_ROWS rows and the product is bound by reading the weights. The kernel streams W in
nn.Linear's own (out, in) layout once per call whatever the number of rows (benchmarks/cpu_gemv.py measures it
against MKL), and row m of the result never depends on the other rows (batch invariance).

It is used when x is fp32 on the CPU with at most MAX_ROWS rows (leading dims flattened), weight is a
contiguous fp32 (O, I) matrix, no gradient is wanted, and the extension is available (build.py compiles it on
first use); everything else goes to F.linear, with the same result within fp32 rounding.

Usage:
    from lmstack.kernels import skinny_linear, available, info
    with torch.inference_mode():
        y = skinny_linear(x, layer.weight, layer.bias)   # == F.linear(x, layer.weight, layer.bias)
    available()   # True once the extension is built and loaded (builds it if needed)
    info()        # {"enabled", "built", "path", "isa", "error"}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.kernels.build import enabled, extension

# Rows up to which the kernel is used. benchmarks/cpu_gemv.py (2 threads, llama-base shapes) measured it ahead
# of F.linear (MKL) at every M up to 32 and still at 48 on most shapes; by 64 the product is compute-bound and
# MKL's blocked GEMM catches up. 32 covers the engine's decode batches (max_num_seqs 16) and speculative
# verification of a few requests x (k + 1) tokens.
MAX_ROWS = 32


_F32 = torch.float32


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the kernel when x is a few fp32 CPU rows (see the module docstring)."""
    # Cheapest tests first: a decode step makes ~50 of these calls, so the wrapper's own cost counts.
    d = x.shape[-1] if x.dim() else -1
    rows = x.numel() // d if d > 0 else 0
    if (not 1 <= rows <= MAX_ROWS or x.dtype is not _F32 or weight.dtype is not _F32 or not x.is_cpu
            or not weight.is_cpu or weight.dim() != 2 or d != weight.shape[1] or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    if bias is not None and (bias.dtype is not _F32 or not bias.is_cpu or bias.dim() != 1
                             or bias.shape[0] != weight.shape[0]):
        return F.linear(x, weight, bias)
    ext = extension() if enabled() else None
    if ext is None:
        return F.linear(x, weight, bias)
    y = ext.skinny_linear(x.reshape(rows, d), weight, bias.contiguous() if bias is not None else None)
    return y.view(*x.shape[:-1], weight.shape[0])
