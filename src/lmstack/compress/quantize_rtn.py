"""Round-to-nearest weight quantization and QuantizedWeight, the one result type of every weight quantizer.

A weight W (O, I) is cut along its input dimension into groups of group_size columns; each row of each group
gets a scale (and, asymmetric, an integer zero point), and every weight becomes an integer code:

- asymmetric (the int4 default): codes in [0, 2^b - 1], w ~ (code - zero) * scale, with the group's range
  widened to include 0 so that zero stays exact;
- symmetric (int8's default): codes in [-(2^(b-1) - 1), 2^(b-1) - 1], w ~ code * scale, scale = absmax / qmax.

int8 per output channel is group_size = in_features. Round to nearest is within half a step of every weight.
GPTQ (gptq.py) and AWQ (awq.py) return the same type; GPTQ's act-order quantizes the columns in a permuted
order, recorded in `perm` (stored column j is input column perm[j]; groups are runs of stored columns).

Usage:
    from lmstack.compress.quantize_rtn import quantize_rtn, dequantize
    qw = quantize_rtn(w, bits=4, group_size=128)               # asymmetric int4, groups of 128
    qw8 = quantize_rtn(w, bits=8, group_size=None, symmetric=True)   # int8 per output channel
    w_hat = dequantize(qw)                                     # fp32 (O, I)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import LmstackError


@dataclass
class QuantizedWeight:
    """Integer codes and their constants. codes: (O, I) uint8 (asymmetric) or int8 (symmetric);
    scales: (O, I // group_size) fp32; zeros: (O, I // group_size) uint8, or None when symmetric;
    perm: None, or the LongTensor (I,) giving the input column of each stored column."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def check_group(in_features: int, group_size: int | None, bits: int) -> int:
    """The group size to use (None -> in_features); an error names both numbers when it does not divide."""
    if not 2 <= bits <= 8:
        raise LmstackError(f"bits must be between 2 and 8; got {bits}")
    g = in_features if group_size in (None, -1, 0) else int(group_size)
    if g <= 0 or in_features % g:
        raise LmstackError(f"group size {group_size} does not divide in_features {in_features}; choose a divisor "
                           f"of {in_features} (or None for one group per output channel)")
    return g


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (O,) and zero point (O,) (None if symmetric) of the columns w (O, g), one per row."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    qmax = 2 ** bits - 1
    lo = w.amin(dim=1).clamp(max=0)  # the range includes 0: a zero weight (padding, pruned) stays exact
    hi = w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of w (O, k) under per-row scale/zero (O,): round to nearest, clamped to the code range (fp32)."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Values of codes (O, k) (any dtype) under per-row scale/zero (O,)."""
    c = codes.float()
    if zero is not None:
        c = c - zero.float()[:, None]
    return c * scale[:, None]


def pack_result(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
                perm: torch.Tensor | None = None) -> QuantizedWeight:
    """QuantizedWeight from fp32 codes/scales/zeros, with the integer dtypes of the type's contract."""
    code_dtype = torch.int8 if zeros is None else torch.uint8
    return QuantizedWeight(codes.to(code_dtype), scales.float().contiguous(),
                           None if zeros is None else zeros.to(torch.uint8), bits, group_size, perm)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                 symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of w (O, I), groupwise along the input dimension."""
    if w.dim() != 2:
        raise LmstackError(f"expected a 2-D weight (out_features, in_features); got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise LmstackError("the weight holds NaN or inf; round to nearest would store garbage codes")
    o, i = w.shape
    g = check_group(i, group_size, bits)
    rows = w.reshape(-1, g)  # each row of each group is one row here: the same per-row rule as GPTQ's
    scale, zero = group_params(rows, bits, symmetric)
    codes = encode(rows, scale, zero, bits).reshape(o, i)
    return pack_result(codes, scale.reshape(o, i // g), None if zero is None else zero.reshape(o, i // g), bits, g)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 (O, I) weight the codes stand for, columns back in input order."""
    o, i = qw.codes.shape
    g = qw.group_size
    c = qw.codes.float().reshape(o, i // g, g)
    if qw.zeros is not None:
        c = c - qw.zeros.float()[..., None]
    w = (c * qw.scales[..., None]).reshape(o, i)
    if qw.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, qw.perm] = w
    return out
