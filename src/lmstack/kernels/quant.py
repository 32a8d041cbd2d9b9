"""int8_linear / int4_linear: F.linear on a weight-only quantized weight, reading the packed codes directly.

The weight is given in the canonical buffers compress/qlinear.py saves (O output features, I input features,
G groups of g = I // G consecutive input features per output row):
    int8: codes int8 (O, I), scales fp32 (O, G):                 w[o, i] = codes[o, i] * scales[o, i // g]
    int4: codes uint8 (O, ceil(I / 2)), column 2j in the low nibble of byte j, 2j + 1 in the high one (0..15);
          scales fp32 (O, G), zeros uint8 (O, G) in 0..15:       w[o, i] = (code - zeros[o, i // g]) * scales[o, i // g]

Both functions return F.linear(x, w, bias) for any x of shape (..., I) and any dtype. When x is 1..MAX_ROWS fp32
rows on the CPU (a decode step) and no gradient is wanted, the C++ kernel in quant_gemm.cpp computes it
without ever writing w: it decodes each chunk of codes in registers into exactly the fp32 values above and
multiplies it with every x row (benchmarks/quant_gemv.py measures it). Those results equal F.linear on the
dequantized weight up to the order of the fp32 sums: |difference| <= 2 * I * 2^-24 * sum_i |w[o, i] x[i]|
(tests/kernels/test_quant_gemm.py asserts this bound), and row m of a batched call is bitwise the single-row
call (batch invariance). Everything else (prefill, autograd, other dtypes or devices, int4 with an odd group
size, no compiler) dequantizes and calls F.linear, which is the definition above.

Unlike skinny_linear, these run whenever a quantized layer runs, not only inside decode_kernels(): there is no
fp32 weight to fall back on cheaply, and the kernel's numbers are as good as the fallback's.

Usage:
    from lmstack.kernels import int8_linear, int4_linear
    y = int8_linear(x, codes, scales, bias)                      # codes int8 (O, I), scales (O, G)
    y = int4_linear(x, codes, scales, zeros, group_size, bias)   # codes uint8 (O, ceil(I / 2)), zeros (O, G)
    w = dequantize_int4(codes, scales, zeros, group_size)        # the fp32 (O, I) weight these stand for
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.kernels.build import enabled, extension
from lmstack.kernels.skinny import MAX_ROWS

_F32 = torch.float32


def _bad(name: str, what: str) -> LmstackError:
    return LmstackError(f"{name}: {what}")


def _check_common(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, code_dtype: torch.dtype,
                  in_features: int, bias: torch.Tensor | None) -> None:
    """Shape and dtype errors common to both functions, naming the offending buffer."""
    if codes.dtype is not code_dtype or codes.dim() != 2:
        raise _bad(name, f"codes must be a 2-D {code_dtype} tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    O = codes.shape[0]
    if scales.dtype is not _F32 or scales.dim() != 2 or scales.shape[0] != O or scales.shape[1] < 1:
        raise _bad(name, f"scales must be a float32 (out_features={O}, groups) tensor, got {scales.dtype} of "
                         f"shape {tuple(scales.shape)}")
    if not (x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == in_features):
        raise _bad(name, f"x must be a floating-point tensor (..., in_features={in_features}), got {x.dtype} of "
                         f"shape {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != O or not bias.is_floating_point()):
        raise _bad(name, f"bias must be a floating-point vector of out_features={O} values, got {bias.dtype} of "
                         f"shape {tuple(bias.shape)}")


def _check_int8(x, codes, scales, bias) -> None:
    name = "int8_linear"
    if codes.dim() == 2 and scales.dim() == 2 and scales.shape[1] >= 1 and codes.shape[1] % scales.shape[1]:
        raise _bad(name, f"{scales.shape[1]} scale groups do not divide in_features={codes.shape[1]}")
    _check_common(name, x, codes, scales, torch.int8, codes.shape[1] if codes.dim() == 2 else -1, bias)


def _check_int4(x, codes, scales, zeros, group_size, bias) -> None:
    """in_features I = groups * group_size; codes hold ceil(I / 2) bytes a row (odd I: the last high nibble is
    padding)."""
    name = "int4_linear"
    if not isinstance(group_size, int) or group_size <= 0:
        raise _bad(name, f"group_size must be a positive int, got {group_size!r}")
    I = group_size * scales.shape[1] if scales.dim() == 2 else -1
    if codes.dim() == 2 and I > 0 and codes.shape[1] != (I + 1) // 2:
        raise _bad(name, f"codes have {codes.shape[1]} bytes a row but groups={scales.shape[1]} x group_size="
                         f"{group_size} = {I} in_features need {(I + 1) // 2} (two codes per byte)")
    _check_common(name, x, codes, scales, torch.uint8, I, bias)
    if zeros.dtype is not torch.uint8 or zeros.shape != scales.shape:
        raise _bad(name, f"zeros must be a uint8 tensor shaped like scales {tuple(scales.shape)}, got "
                         f"{zeros.dtype} of shape {tuple(zeros.shape)}")


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 (O, I) weight: codes * their group's scale."""
    O, I = codes.shape
    G = scales.shape[1]
    return (codes.reshape(O, G, I // G).float() * scales.reshape(O, G, 1)).reshape(O, I)


def unpack_int4(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (O, ceil(I / 2)) packed codes -> uint8 (O, I) codes 0..15 (low nibble first)."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)[:, :in_features]


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 (O, I) weight: (code - zero) * scale, per group; the same fp32 values the kernel decodes."""
    O, G = scales.shape
    c = unpack_int4(codes, G * group_size).reshape(O, G, group_size).float()
    return ((c - zeros.reshape(O, G, 1).float()) * scales.reshape(O, G, 1)).reshape(O, G * group_size)


def _kernel_rows(x: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The number of x rows when the kernel applies (1..MAX_ROWS fp32 CPU rows, no autograd), else 0.
    A decode step makes ~80 of these calls, so the checks here are the cheap ones; the extension checks the
    buffers itself (shapes, dtypes, contiguity) and a failure there is re-checked in Python for a clear error."""
    if x.dtype is not _F32 or not x.is_cpu or x.dim() == 0:
        return 0
    d = x.shape[-1]
    rows = x.numel() // d if d > 0 else 0
    if not 1 <= rows <= MAX_ROWS:
        return 0
    if bias is not None and (bias.dtype is not _F32 or not bias.is_cpu or bias.requires_grad):
        return 0
    if x.requires_grad and torch.is_grad_enabled():
        return 0
    return rows


def _fallback(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = w.to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def _run(kernel, x: torch.Tensor, rows: int, out_features: int, check, args: tuple) -> torch.Tensor:
    """kernel(x as (rows, I), *args); a bad buffer the extension refuses is re-checked here for the clear error."""
    x2 = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])
    try:
        y = kernel(x2, *args)
    except (RuntimeError, TypeError):
        check()   # raises the LmstackError that names the problem
        raise     # the extension saw something the checks do not cover (e.g. codes on another device)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, codes * scales per group, bias); see the module docstring."""
    rows = _kernel_rows(x, bias)
    ext = extension() if rows and enabled() else None
    if ext is not None:
        return _run(ext.int8_linear, x, rows, codes.shape[0], lambda: _check_int8(x, codes, scales, bias),
                    (codes, scales, bias))
    _check_int8(x, codes, scales, bias)
    return _fallback(x, dequantize_int8(codes, scales), bias)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, (code - zero) * scale per group, bias), two codes per byte; see the module docstring."""
    rows = _kernel_rows(x, bias)
    # The kernel pairs each byte with two x columns of one group: odd I or odd groups take the fallback.
    ext = extension() if rows and enabled() and group_size % 2 == 0 else None
    if ext is not None:
        return _run(ext.int4_linear, x, rows, codes.shape[0],
                    lambda: _check_int4(x, codes, scales, zeros, group_size, bias),
                    (codes, scales, zeros, group_size, bias))
    _check_int4(x, codes, scales, zeros, group_size, bias)
    return _fallback(x, dequantize_int4(codes, scales, zeros, group_size), bias)
