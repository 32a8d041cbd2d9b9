"""Quantized weight storage: int8 (per-output-channel absmax) and 4-bit NF4 with double quantization.

QuantizedLinear keeps a Linear's weight as integer codes plus scale constants (buffers, not
parameters: the base is frozen) and dequantizes it on the fly in forward (and again in backward),
so the fp32 weight never lives in memory between calls. This is QLoRA's storage (Dettmers et al. 2023):

- NF4: the weight is cut into blocks of 64; each block is divided by its absmax, and every value is
  replaced by the nearest of 16 levels placed at quantiles of N(0, 1) (normally distributed weights
  use every level about equally often). Two 4-bit codes are packed into one byte.
- Double quantization: the fp32 absmax of each block (32 bits / 64 weights = 0.5 bit per weight) is
  itself quantized: minus its mean, to 8-bit codes with one fp32 scale per 256 blocks (0.127 bit per
  weight). The paper uses an 8-bit float there; we use symmetric int8, which is simpler and as accurate
  for these positive, narrow-range constants.
- int8: one fp32 scale per output row, codes round(W / scale) in [-127, 127].

Usage:
    from lmstack.compress import QuantizedLinear, quantize_model
    q = QuantizedLinear.from_linear(nn.Linear(256, 256), kind="nf4", double_quant=True)
    y = q(x)                                   # dequantizes, then F.linear
    q.storage_bytes(), q.fp32_bytes()          # about 4.13 bits vs 32 bits per weight
    report = quantize_model(model, kind="nf4", skip=("lm_head",))   # in place; {"bytes_saved": ...}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError

NF4_BLOCK = 64
DQ_BLOCK = 256
QUANT_KINDS = ("int8", "nf4")


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1]: 8 positive and 7 negative quantiles of N(0, 1), plus an exact zero.

    Asymmetric so that 0 is representable (padding and zero weights stay exact); the outermost quantile
    is taken at p = 0.9677 (the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16)) so the extremes are finite."""
    p = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    pos = torch.special.ndtri(torch.linspace(p, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(p, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


NF4 = nf4_levels()
# Byte -> its two levels (high nibble first): decoding is one gather per byte instead of shifts and masks.
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-flat.numel()) % block
    return F.pad(flat, (0, pad)).view(-1, block)


def quantize_absmax_int8(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Double quantization of positive constants: (values - mean) to int8 with one scale per 256."""
    offset = values.mean()
    blocks = _blocks(values - offset, DQ_BLOCK)
    scale = blocks.abs().amax(dim=1).clamp_min(1e-12) / 127
    codes = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"absmax_codes": codes.flatten()[: values.numel()].contiguous(), "absmax_scale": scale.float(),
            "absmax_offset": offset.reshape(1).float()}


def dequantize_absmax_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    blocks = _blocks(codes.float(), DQ_BLOCK) * scale[:, None]
    return blocks.flatten()[:n] + offset


def quantize_nf4(w: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 codes (two per byte) and per-block absmax (fp32, or double-quantized) of a float tensor."""
    blocks = _blocks(w.detach().float().flatten(), NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    if double_quant:
        # Quantize the constants first and normalise with the values the decoder will use, so the 4-bit
        # codes are chosen for the absmax that is actually stored.
        state = quantize_absmax_int8(absmax)
        absmax = dequantize_absmax_int8(state["absmax_codes"], state["absmax_scale"], state["absmax_offset"])
        absmax = absmax.clamp_min(1e-12)
    else:
        state = {"absmax": absmax}
    normed = (blocks / absmax[:, None]).clamp(-1, 1)
    # Nearest level by midpoints: bucketize is O(n log 16) and never builds an (n, 16) distance matrix.
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = torch.bucketize(normed.flatten(), mids).to(torch.uint8)
    state["packed"] = (codes[0::2] << 4) | codes[1::2]
    return state


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    packed = state["packed"]
    if "absmax" in state:
        absmax = state["absmax"]
    else:
        absmax = dequantize_absmax_int8(state["absmax_codes"], state["absmax_scale"], state["absmax_offset"])
    values = NF4_PAIRS.to(packed.device)[packed.long()].view(-1, NF4_BLOCK) * absmax[:, None]
    n = 1
    for s in shape:
        n *= s
    return values.flatten()[:n].view(shape).to(dtype)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-output-row absmax int8 codes of a 2-D weight."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return {"codes": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def dequantize_int8(state: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return (state["codes"].float() * state["scale"][:, None]).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored as int8 or NF4 codes and dequantized in forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str = "nf4", double_quant: bool = True):
        super().__init__()
        if kind not in QUANT_KINDS:
            raise LmstackError(f"quantization kind {kind!r} is not known; choose one of {', '.join(QUANT_KINDS)}")
        if weight.dim() != 2:
            raise LmstackError(f"QuantizedLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.kind, self.double_quant = kind, double_quant
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self._state_names: list[str] = []
        self.requantize(weight)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "nf4", double_quant: bool = True) -> "QuantizedLinear":
        return cls(linear.weight, linear.bias, kind, double_quant)

    @property
    def n_quantized_params(self) -> int:
        """Weights held as codes (buffers): trainable_report counts them in the model's total."""
        return self.out_features * self.in_features

    def requantize(self, weight: torch.Tensor) -> None:
        """Store `weight` (out, in), replacing the codes. Used at build time and when merging an adapter."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise LmstackError(f"weight of shape {tuple(weight.shape)} does not fit a "
                               f"({self.out_features}, {self.in_features}) QuantizedLinear")
        state = quantize_nf4(weight, self.double_quant) if self.kind == "nf4" else quantize_int8(weight)
        for name in self._state_names:
            delattr(self, name)
        for name, t in state.items():
            self.register_buffer(name, t.to(weight.device))
        self._state_names = list(state)

    def dequantize(self) -> torch.Tensor:
        state = {n: getattr(self, n) for n in self._state_names}
        if self.kind == "nf4":
            return dequantize_nf4(state, (self.out_features, self.in_features), self.compute_dtype)
        return dequantize_int8(state, self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor each time; code that reads .weight keeps working)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: codes and constants (the bias is left out, as in fp32_bytes)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._state_names)

    def fp32_bytes(self) -> int:
        return 4 * self.n_quantized_params

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"double_quant={self.double_quant}, bits_per_weight={8 * self.storage_bytes() / self.n_quantized_params:.3f}")


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward, so autograd never keeps the fp32
    weight alive between the two (QLoRA's memory saving would otherwise vanish during training). The codes
    are frozen, so the only gradient is the input's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


def quantize_model(model: nn.Module, kind: str = "nf4", double_quant: bool = True,
                   skip: tuple[str, ...] = ("lm_head", "router")) -> dict:
    """Replace every nn.Linear (name not ending with one of `skip`) by a QuantizedLinear, in place.

    Returns {"layers": n, "fp32_bytes": ..., "quantized_bytes": ..., "bytes_saved": ..., "bits_per_weight": ...}."""
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n and not n.endswith(skip)]
    fp32 = quant = 0
    for name, linear in targets:
        q = QuantizedLinear.from_linear(linear, kind, double_quant)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        fp32, quant = fp32 + q.fp32_bytes(), quant + q.storage_bytes()
    n_weights = fp32 // 4
    return {"layers": len(targets), "fp32_bytes": fp32, "quantized_bytes": quant, "bytes_saved": fp32 - quant,
            "bits_per_weight": 8 * quant / n_weights if n_weights else 0.0}
