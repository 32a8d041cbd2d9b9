"""QuantLinear: the Linear of a quantized model directory, computing from its packed weights at run time.

One module for every weight format `lmstack quantize` writes (qformat.py saves and loads them):

- "int8": codes int8 (O, I), symmetric; scales fp32 (O, G), G = I / group_size (G = 1: one per output channel);
  w = code * scale.
- "int4": codes uint8 (O, ceil(I / 2)), two per byte, column 2j in the LOW nibble of byte j and 2j + 1 in the high
  one (the byte order compressed-tensors' pack-quantized int32 words have on a little-endian machine), unsigned
  codes 0..15; scales fp32 (O, G); zeros uint8 (O, G), 8 everywhere when symmetric; w = (code - zero) * scale.
  GPTQ's act-order keeps its columns in quantization order: `perm` (I,) says which input column each stored
  column is, and forward gathers x's columns once instead of scattering the weight.
- "w8a8" (SmoothQuant): int8 weights as "int8" with one scale per channel, and the activations quantized to int8
  per token at run time; the product is computed in integers (lmstack.kernels.quant.w8a8_linear: a C++ int8 x
  int8 -> int32 kernel for decode rows, torch._int_mm past them, bit for bit smoothquant.w8a8_linear's reference).
- "fp8_e4m3" / "fp8_e5m2": codes float8 (O, I) with one fp32 scale per output channel.

Forward never keeps an fp32 copy of the weight: int8 and int4 go through lmstack.kernels.quant, whose C++ kernels
read the packed codes directly for decode-sized inputs and dequantize per call otherwise; w8a8 multiplies in
integers through the same module; fp8 dequantizes per call. The codes are buffers, so `.to(dtype)` leaves them alone, and the
module has no trainable weight.

Usage:
    from lmstack.compress.qlinear import QuantLinear, quantize_linears
    q = QuantLinear.from_weight(qw, bias=None)                  # qw: a QuantizedWeight (RTN / GPTQ / AWQ)
    y = q(x)                                                    # ~= F.linear(x, dequantize(qw))
    quantize_linears(model, bits=4, group_size=128)             # every block Linear, round to nearest, in place
    quantize_head(model)                                        # the LM head and the embedding to int8
    q.weight_fp32()                                             # the (O, I) weight it computes with, input order
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress.calibration import block_linears
from lmstack.compress.quantize_rtn import QuantizedWeight, quantize_rtn
from lmstack.errors import LmstackError
from lmstack.kernels import quant as quant_kernels
from lmstack.kernels.quant import dequantize_int4, dequantize_int8

FORMATS = ("int8", "int4", "w8a8", "fp8_e4m3", "fp8_e5m2")
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (O, I) codes 0..15 -> (O, ceil(I / 2)) bytes, even columns in the low nibble (odd I: padded 0); the
    inverse is lmstack.kernels.quant.unpack_int4."""
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()





class QuantLinear(nn.Module):
    """A frozen Linear stored as codes + constants (see the module docstring for each format's layout)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None,
                 bias: bool = False, act_order: bool = False, method: str = "rtn"):
        super().__init__()
        if fmt not in FORMATS:
            raise LmstackError(f"unknown quantized weight format {fmt!r}; known: {', '.join(FORMATS)}")
        g = in_features if group_size in (None, -1, 0) else int(group_size)
        if g <= 0 or in_features % g:
            raise LmstackError(f"group size {group_size} does not divide in_features {in_features}")
        if fmt in ("w8a8", "fp8_e4m3", "fp8_e5m2") and g != in_features:
            raise LmstackError(f"{fmt} stores one scale per output channel; group size {group_size} is not supported")
        self.in_features, self.out_features, self.fmt, self.group_size = in_features, out_features, fmt, g
        self.method = method
        n_groups = in_features // g
        if fmt == "int4":
            codes = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
            self.register_buffer("zeros", torch.full((out_features, n_groups), 8, dtype=torch.uint8))
        else:
            codes = torch.zeros(out_features, in_features, dtype=FP8_DTYPES.get(fmt, torch.int8))
            self.register_buffer("zeros", None)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("perm", torch.arange(in_features) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @property
    def bits(self) -> int:
        return 4 if self.fmt == "int4" else 8

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, fmt: str | None = None,
                    method: str = "rtn") -> "QuantLinear":
        """A QuantLinear holding a QuantizedWeight (quantize_rtn, gptq_quantize, awq_model...). fmt defaults
        to "int4" for 4-bit and "int8" for symmetric 8-bit codes ("w8a8" for SmoothQuant's)."""
        o, i = qw.shape
        fmt = fmt or {4: "int4", 8: "int8"}.get(qw.bits)
        if fmt not in ("int4", "int8", "w8a8"):
            raise LmstackError(f"a {qw.bits}-bit QuantizedWeight has no QuantLinear format; use 4 or 8 bits")
        if fmt in ("int8", "w8a8") and not (qw.bits == 8 and qw.symmetric):
            raise LmstackError(f"{fmt} needs symmetric 8-bit codes (quantize_rtn(w, 8, symmetric=True))")
        if fmt == "int4" and qw.bits != 4:
            raise LmstackError(f"int4 needs 4-bit codes, got {qw.bits}-bit")
        m = cls(i, o, fmt, qw.group_size, bias is not None, act_order=qw.perm is not None, method=method)
        if fmt == "int4":
            if qw.symmetric:  # codes -7..7 around zero point 8
                m.codes.copy_(pack_nibbles((qw.codes.to(torch.int16) + 8).to(torch.uint8)))
            else:
                m.codes.copy_(pack_nibbles(qw.codes))
                m.zeros.copy_(qw.zeros)
        else:
            m.codes.copy_(qw.codes)
        m.scales.copy_(qw.scales)
        if qw.perm is not None:
            m.perm.copy_(qw.perm)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    @classmethod
    def from_fp8(cls, w: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "fp8_e4m3") -> "QuantLinear":
        """FP8 storage: each output row divided by absmax / (the format's largest finite value), then cast."""
        if fmt not in FP8_DTYPES:
            raise LmstackError(f"fp8 format must be one of {', '.join(FP8_DTYPES)}, got {fmt!r}")
        w = w.detach().float()
        fmax = torch.finfo(FP8_DTYPES[fmt]).max
        scale = w.abs().amax(dim=1, keepdim=True) / fmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        m = cls(w.shape[1], w.shape[0], fmt, None, bias is not None, method="fp8")
        m.codes.copy_((w / scale).to(FP8_DTYPES[fmt]))
        m.scales.copy_(scale)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def weight_fp32(self) -> torch.Tensor:
        """The (O, I) fp32 weight this layer computes with, columns in input order (a fresh tensor)."""
        w = self._stored_weight()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise LmstackError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        bias = self.bias
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.fmt == "w8a8":
            return quant_kernels.w8a8_linear(x, self.codes, self.scales, bias)
        if self.fmt == "int8":
            return quant_kernels.int8_linear(x, self.codes, self.scales, bias)
        if self.fmt == "int4":
            return quant_kernels.int4_linear(x, self.codes, self.scales, self.zeros, self.group_size, bias)
        w = self._stored_weight()
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _stored_weight(self) -> torch.Tensor:
        """The fp32 weight in stored column order (what x gathered by perm multiplies)."""
        if self.fmt == "int4":
            return dequantize_int4(self.codes, self.scales, self.zeros, self.group_size)
        if self.fmt in FP8_DTYPES:
            return self.codes.float() * self.scales
        return dequantize_int8(self.codes, self.scales)

    @staticmethod
    def rows_fusable(parts: list["QuantLinear"]) -> bool:
        """Whether cat_rows can stack these layers: one format, input width and group size, no act-order
        permutation (each projection's own column order would differ), all with a bias or none."""
        first = parts[0]
        return all(type(p) is QuantLinear and p.fmt == first.fmt and p.in_features == first.in_features
                   and p.group_size == first.group_size and p.perm is None
                   and (p.bias is None) == (first.bias is None) for p in parts)

    @classmethod
    def cat_rows(cls, parts: list[tuple[str, "QuantLinear"]]) -> "QuantLinear":
        """One QuantLinear computing the named parts' outputs side by side (q, k, v rows; gate, up rows): the
        codes and constants of each output row are its own, so stacking them is exact. Used when the engine fuses
        a quantized model's projections at load (model/fused_projections.py); `parts` and `split_sizes` say
        where each part's rows are, as FusedLinear's do."""
        mods = [m for _, m in parts]
        if not cls.rows_fusable(mods):
            raise LmstackError("cannot fuse quantized projections of different formats, widths, group sizes or "
                               "act-order permutations: " + ", ".join(f"{n}: {m.extra_repr()}" for n, m in parts))
        first = mods[0]
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.fmt, first.group_size,
                    first.bias is not None, method=first.method)
        fused.codes = torch.cat([m.codes for m in mods])
        fused.scales = torch.cat([m.scales for m in mods])
        if first.zeros is not None:
            fused.zeros = torch.cat([m.zeros for m in mods])
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        fused.parts = tuple((n, m.out_features) for n, m in parts)
        return fused

    def split_sizes(self) -> list[int]:
        return [rows for _, rows in getattr(self, "parts", (("", self.out_features),))]

    def storage_bytes(self) -> int:
        """Bytes of codes and constants (the bias is left out, as in fp32_bytes)."""
        ts = [self.codes, self.scales] + [t for t in (self.zeros, self.perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def fp32_bytes(self) -> int:
        return 4 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, method={self.method}, act_order={self.perm is not None}")


class QuantEmbedding(nn.Module):
    """An input embedding stored as int8 codes (vocab, d_model) with one scale per row, as GGUF's q8_0
    token_embd; forward dequantizes only the rows it gathers. `QuantEmbedding.from_int8(q)` takes the codes of an
    int8 QuantLinear: for a tied model that is the LM head itself, so the tied pair is stored once."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, 1))

    @classmethod
    def from_int8(cls, q: QuantLinear) -> "QuantEmbedding":
        if q.fmt != "int8" or q.group_size != q.in_features or q.perm is not None:
            raise LmstackError("a quantized embedding needs int8 codes with one scale per row "
                               f"(got fmt={q.fmt}, group_size={q.group_size})")
        m = cls(q.out_features, q.in_features)
        m.codes, m.scales = q.codes, q.scales  # the same tensors, not copies
        return m

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codes[idx].float() * self.scales[idx]

    @property
    def weight(self) -> torch.Tensor:
        """The (vocab, d_model) fp32 table (a fresh tensor: for the rare readers of a whole embedding)."""
        return dequantize_int8(self.codes, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt=int8"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_linears(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool | None = None,
                     fmt: str | None = None) -> dict[str, QuantLinear]:
    """Round-to-nearest: every Linear in model.blocks becomes a QuantLinear, in place. int8 is symmetric per
    group (per channel for group_size None), int4 asymmetric unless symmetric=True. fmt "fp8_e4m3"/"fp8_e5m2"
    stores FP8 instead (bits and group_size are then ignored). Returns {name: QuantLinear}."""
    out = {}
    for name, lin in block_linears(model).items():
        if fmt in FP8_DTYPES:
            q = QuantLinear.from_fp8(lin.weight, lin.bias, fmt)
        else:
            sym = (bits == 8) if symmetric is None else symmetric
            q = QuantLinear.from_weight(quantize_rtn(lin.weight, bits, group_size, symmetric=sym), lin.bias)
        q.to(lin.weight.device)
        replace_module(model, name, q)
        out[name] = q
    return out


@torch.no_grad()
def quantize_head(model: nn.Module) -> QuantLinear:
    """The LM head and the input embedding to int8 with one scale per vocab row, in place. At decode the head is
    the largest single matrix a small model reads per token (llama-base: 32000 x 768, a fifth of its bytes), so
    a weight-only model with an fp32 head stays bound by the head; the embedding is read one row a token, but it
    is as big on disk and in memory. A tied model's QuantEmbedding gathers rows of the head's own codes; an
    untied one gets codes of its own. Returns the new head."""
    cfg = model.config
    if cfg.head != "lm":
        raise LmstackError(f"only an LM head can be quantized (this model's head is {cfg.head!r})")
    if isinstance(model.lm_head, QuantLinear):
        raise LmstackError("the LM head is already quantized")
    tied = model.lm_head is None
    w = model.tok_emb.weight if tied else model.lm_head.weight
    q = QuantLinear.from_weight(quantize_rtn(w.detach(), 8, None, symmetric=True), None, method="rtn").to(w.device)
    model.lm_head = q
    if tied:
        model.tok_emb = QuantEmbedding.from_int8(q)
    else:
        e = model.tok_emb.weight.detach()
        model.tok_emb = QuantEmbedding.from_int8(
            QuantLinear.from_weight(quantize_rtn(e, 8, None, symmetric=True), None, method="rtn").to(e.device))
    return q
