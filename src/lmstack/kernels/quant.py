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

w8a8_linear is SmoothQuant's W8A8 product (compress/smoothquant.py's w8a8_linear is its reference): x is quantized
to int8 per row (token), xs = max|x| / 127, xq = clamp(round_half_even(x / xs), -127, 127); the product
xq @ codes^T is summed exactly in int32; y = float(sum) * xs * wscale[o] (+ bias), wscales one fp32 per output
channel. Decode-sized inputs (as above) run w8a8_gemm.cpp's integer kernel (AVX-512 VNNI vpdpbusd here);
anything else runs the same steps in torch with torch._int_mm (exact int32) for the product. Both make the
reference's codes and its fp32 steps in its order, so the result equals the reference bit for bit (the tests
assert torch.equal), and row m never depends on the other rows. A row holding NaN or inf gives NaN outputs.
Activations are quantized from x.detach(): only the bias receives a gradient, as in the reference.

Usage:
    from lmstack.kernels import int8_linear, int4_linear
    from lmstack.kernels.quant import w8a8_linear
    y = int8_linear(x, codes, scales, bias)                      # codes int8 (O, I), scales (O, G)
    y = int4_linear(x, codes, scales, zeros, group_size, bias)   # codes uint8 (O, ceil(I / 2)), zeros (O, G)
    y = w8a8_linear(x, codes, wscales, bias)                     # codes int8 (O, I), wscales (O,) or (O, 1)
    w = dequantize_int4(codes, scales, zeros, group_size)        # the fp32 (O, I) weight these stand for
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.kernels.build import enabled, extension
from lmstack.kernels.skinny import MAX_ROWS

_F32 = torch.float32
INT8_MAX = 127
# in_features at or above this could overflow the int32 sum (|x code * w code| <= 127^2); the reference's limit
W8A8_MAX_IN = 2 ** 31 // INT8_MAX ** 2
_int_mm = getattr(torch, "_int_mm", None)  # int8 x int8 -> int32 (CPU: oneDNN); absent from old torch


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


def _check_w8a8(x, codes, wscales, bias) -> None:
    name = "w8a8_linear"
    if codes.dtype is not torch.int8 or codes.dim() != 2 or codes.shape[1] < 1:
        raise _bad(name, f"codes must be a 2-D torch.int8 tensor (out_features, in_features >= 1), got "
                         f"{codes.dtype} of shape {tuple(codes.shape)}")
    O, I = codes.shape
    if I >= W8A8_MAX_IN:
        raise _bad(name, f"in_features={I} could overflow the int32 accumulator (limit {W8A8_MAX_IN})")
    if (wscales.dtype is not _F32 or wscales.numel() != O or not (wscales.dim() == 1
                                                                    or (wscales.dim() == 2 and wscales.shape[0] == O))):
        raise _bad(name, f"wscales must be float32 with one scale per output channel, shape ({O},) or ({O}, 1), got "
                         f"{wscales.dtype} of shape {tuple(wscales.shape)}")
    if not (x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == I):
        raise _bad(name, f"x must be a floating-point tensor (..., in_features={I}), got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != O or not bias.is_floating_point()):
        raise _bad(name, f"bias must be a floating-point vector of out_features={O} values, got {bias.dtype} of "
                         f"shape {tuple(bias.shape)}")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) int8 codes (M, I) and fp32 scales (M, 1) of a 2-D x: w8a8_linear's activations. A row
    with NaN or inf gets a NaN scale (its codes are meaningless)."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
    q = torch.clamp(torch.round(xf / scale), -INT8_MAX, INT8_MAX)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8), scale


def _int_products(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """xq (M, I) @ codes (O, I)^T in exact int32. torch._int_mm where it takes the shapes (CPU: any); else float64,
    whose sums are exact here (integers below 2^31 < 2^53)."""
    if _int_mm is not None:
        try:
            return _int_mm(xq, codes.t())
        except RuntimeError:  # e.g. CUDA's shape rules (rows > 16, sizes multiples of 8)
            pass
    return F.linear(xq.double(), codes.double()).to(torch.int32)


def _w8a8_torch(x, codes, wscales, bias) -> torch.Tensor:
    """w8a8_linear in torch ops, for any rows, dtype and device: the reference's steps, the product in int32."""
    O, I = codes.shape
    xq, xs = quantize_rows(x.reshape(-1, I))
    if xq.shape[0] == 0:
        y = xq.new_zeros((0, O), dtype=_F32)
    else:
        y = _int_products(xq, codes).float() * xs * wscales.reshape(1, O)
    y = y.reshape(*x.shape[:-1], O)
    return (y if bias is None else y + bias.float()).to(x.dtype)


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


def w8a8_linear(x: torch.Tensor, codes: torch.Tensor, wscales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothQuant's W8A8 linear: x int8 per token, times int8 codes, in int32, rescaled (see the module docstring).
    Returned in x's dtype."""
    rows = _kernel_rows(x, bias)
    ext = extension() if rows and enabled() else None
    if ext is not None:
        return _run(ext.w8a8_linear, x, rows, codes.shape[0], lambda: _check_w8a8(x, codes, wscales, bias),
                    (codes, wscales, bias))
    _check_w8a8(x, codes, wscales, bias)
    return _w8a8_torch(x, codes, wscales, bias)
