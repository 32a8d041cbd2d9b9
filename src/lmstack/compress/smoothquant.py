"""SmoothQuant (Xiao et al. 2022): W8A8 made accurate by moving activation outliers into the weights.

A few input channels of an LLM's linears carry activations 10-100x larger than the rest, so one int8 scale
per token wastes most of its range on them. Since X W^T = (X diag(s)^-1) (W diag(s))^T, dividing channel j
of the activations by s_j = max|X_j|^a / max|W_j|^(1-a) (a = 0.5 splits the difficulty evenly) and
multiplying weight column j by s_j leaves the product unchanged and flattens the activations.

The division is free only where it can be folded into the op that produces X: the RMSNorm (or LayerNorm)
before q/k/v and before gate/up, whose weight becomes weight / s. Those are the linears smoothed here;
o_proj and down_proj read the attention output and the gated activation, where no free fold exists, and
stay as they are (the paper's Llama recipe does the same). One s per norm: q, k and v (or the fused
qkv_proj) share it, taking the max |W_j| over all of them.

Then: weights int8 per output channel (symmetric), activations int8 per token with a scale computed on the
fly (dynamic), the matmul in integers. w8a8_linear is the reference: the int32 accumulation is exact
(|code products| <= 127^2, so sums over fewer than 133,000 inputs fit), then rescaled in fp32. A fast int8
kernel is a separate job.

Usage:
    from lmstack.compress.smoothquant import smooth_model, quantize_w8a8, w8a8_linear
    scales = smooth_model(model, stats, alpha=0.5)   # in place; the fp32 outputs do not change
    qw = quantize_w8a8(model.blocks[0].attn.q_proj.weight)
    y = w8a8_linear(x, qw, bias)                     # ~ x @ W^T + bias with int8 x int8 -> int32
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.compress.calibration import LayerStats
from lmstack.compress.quantize_rtn import QuantizedWeight, quantize_rtn
from lmstack.errors import LmstackError

INT8_MAX = 127
MAX_EXACT_IN = 2 ** 31 // INT8_MAX ** 2


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s (I,) from the calibration max |x_j| (I,) and the weights (O_k, I) that read the same input."""
    if not 0.0 <= alpha <= 1.0:
        raise LmstackError(f"SmoothQuant alpha must be in [0, 1]; got {alpha}")
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    if act_max.shape != w_max.shape:
        raise LmstackError(f"activation max of shape {tuple(act_max.shape)} does not match in_features "
                           f"{w_max.shape[0]}")
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """Make `norm` output its old output divided by s (per channel): weight / s (and bias / s)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise LmstackError(f"cannot fold scales into a {type(norm).__name__}: it has no weight")
    if getattr(norm, "plus_one", False):  # Gemma's (1 + weight)
        weight.copy_((1.0 + weight) / s - 1.0)
    else:
        weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


def _smoothable(block: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(norm name, norm, names of the linears it alone feeds) for one block."""
    if block.norm_position == "post":
        raise LmstackError("SmoothQuant folds scales into the norm before each linear; a post-norm model "
                           "(norm_position='post') has none there")
    attn = block.attn
    qkv = ["qkv_proj"] if attn.qkv_proj is not None else [n for n in ("q_proj", "k_proj", "v_proj")
                                                          if getattr(attn, n) is not None]
    groups = [("attn_norm", block.attn_norm, [f"attn.{n}" for n in qkv])]
    mlp = block.mlp
    # (duck-typed, not isinstance: lmstack.adapt imports this package, and lmstack.model must not be pulled in here)
    if getattr(mlp, "router", None) is None:  # an MoE's norm also feeds its router and stacked experts: left alone
        names = ["gate_up_proj"] if mlp.gate_up_proj is not None else [
            n for n in ("gate_proj", "up_proj") if getattr(mlp, n) is not None]
        groups.append(("mlp_norm", block.mlp_norm, [f"mlp.{n}" for n in names]))
    return groups


@torch.no_grad()
def smooth_model(model: nn.Module, stats: dict[str, LayerStats], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Smooth every block of `model` in place with calibration stats (calibration.collect_stats).
    Returns {norm name: s}. The fp32 function of the model is unchanged."""
    scales = {}
    for b, block in enumerate(model.blocks):
        for norm_name, norm, names in _smoothable(block):
            linears = [block.get_submodule(n) for n in names]
            key = f"blocks.{b}.{names[0]}"
            if key not in stats:
                raise LmstackError(f"no calibration statistics for {key}; collect them from this model")
            s = smooth_scales(stats[key].max_abs, [lin.weight for lin in linears], alpha)
            fold_into_norm(norm, s)
            for lin in linears:
                lin.weight.mul_(s[None, :])
            scales[f"blocks.{b}.{norm_name}"] = s
    return scales


def quantize_w8a8(w: torch.Tensor) -> QuantizedWeight:
    """int8 symmetric weights, one scale per output channel."""
    return quantize_rtn(w, bits=8, group_size=None, symmetric=True)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 activations: codes (..., I) int8 and one fp32 scale per token (..., 1)."""
    scale = x.detach().float().abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(x.float() / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def w8a8_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference W8A8 linear: per-token int8 x times per-channel int8 W, accumulated exactly in int32."""
    if qw.bits != 8 or not qw.symmetric or qw.group_size != qw.shape[1] or qw.perm is not None:
        raise LmstackError("w8a8_linear needs symmetric int8 weights with one scale per output channel "
                           "(quantize_w8a8)")
    i = qw.shape[1]
    if x.shape[-1] != i:
        raise LmstackError(f"input has {x.shape[-1]} features, the weight expects {i}")
    if i >= MAX_EXACT_IN:
        raise LmstackError(f"in_features {i} could overflow the int32 accumulator (limit {MAX_EXACT_IN})")
    xq, xs = quantize_per_token(x)
    acc = torch.matmul(xq.reshape(-1, i).to(torch.int32), qw.codes.to(torch.int32).T)  # exact integers
    y = acc.float() * xs.reshape(-1, 1) * qw.scales[:, 0][None, :]
    y = y.reshape(*x.shape[:-1], qw.shape[0])
    return y if bias is None else y + bias
