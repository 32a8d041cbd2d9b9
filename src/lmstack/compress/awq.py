"""AWQ (Lin et al. 2023): activation-aware weight quantization. Before rounding to int4, scale each input
channel j of W up by s_j (and the input down by s_j): W X = (W diag(s)) (diag(s)^-1 X). Weights on loud input
channels then land on a finer grid relative to their size, at the cost of the quiet channels.

s = mean|x|^alpha (normalised so that sqrt(max s * min s) = 1), with alpha chosen from k / n_grid for
k = 0 .. n_grid - 1 (0, 0.05, ..., 0.95 by default) to minimise the layer's output error on the calibration
inputs. We measure that error through the Hessian the calibration already holds instead of keeping a sample
of X: with dW = W - Q(W diag(s)) diag(s)^-1, ||dW X||^2 summed over the n tokens = tr(dW H dW^T) * n / 2,
exactly. alpha = 0 is plain RTN, so the search never does worse than RTN on the calibration inputs.

Where the scales go. The real method folds diag(s)^-1 into the op before the layer, which is free only where
one op feeds exactly this layer: the RMSNorm before a fused qkv_proj or gate_up_proj (one Linear, one s),
the up rows of gate_up_proj before down_proj. Unfused q/k/v would each want their own s from the same norm,
and o_proj's input channels map to v_proj rows shared across grouped-query heads. So the result keeps s per
input channel (AwqResult.input_scale) and the weight it belongs to is Q(W diag(s)) diag(s)^-1: a packer
folds 1/s into the preceding norm where that is free (smoothquant.fold_into_norm does that fold), or else
stores s beside the codes and divides the activations by it. The paper's weight-clipping search is not done.

Usage:
    from lmstack.compress.awq import awq_quantize, awq_dequantize
    r = awq_quantize(w, stats[name].mean_abs, stats[name].hessian, bits=4, group_size=128)
    w_hat = awq_dequantize(r)            # fp32 (O, I), what the layer computes with
    r.alpha, r.error, r.rtn_error        # the chosen exponent and the output errors, ours vs alpha = 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.compress.quantize_rtn import QuantizedWeight, dequantize, quantize_rtn
from lmstack.errors import LmstackError

N_GRID = 20


@dataclass
class AwqResult:
    qweight: QuantizedWeight   # codes of W diag(s)
    input_scale: torch.Tensor  # s (I,): the layer computes dequantize(qweight) @ (x / s)
    alpha: float
    error: float               # tr(dW H dW^T) at the chosen alpha
    rtn_error: float           # the same at alpha = 0 (plain round to nearest)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the layer's summed squared output error, times 2 / n."""
    d = (w - w_hat).float()
    return ((d @ h.float()) * d).double().sum().item()  # fp32 matmul (fast), fp64 total


def awq_dequantize(r: AwqResult) -> torch.Tensor:
    """The fp32 weight the layer effectively uses: Q(W diag(s)) diag(s)^-1."""
    return dequantize(r.qweight) / r.input_scale[None, :]


def awq_quantize(w: torch.Tensor, mean_abs: torch.Tensor, h: torch.Tensor, bits: int = 4,
                 group_size: int | None = 128, symmetric: bool = False, n_grid: int = N_GRID) -> AwqResult:
    """AWQ of w (O, I) with calibration mean |x| (I,) and Hessian h (I, I)."""
    if w.dim() != 2:
        raise LmstackError(f"expected a 2-D weight (out_features, in_features); got shape {tuple(w.shape)}")
    i = w.shape[1]
    if mean_abs.shape != (i,) or h.shape != (i, i):
        raise LmstackError(f"activation statistics of shape {tuple(mean_abs.shape)} / {tuple(h.shape)} do not "
                           f"match in_features {i}")
    if n_grid < 1:
        raise LmstackError(f"n_grid must be >= 1; got {n_grid}")
    w = w.detach().float()
    x = mean_abs.float().clamp(min=1e-8)  # a dead channel must not produce s = 0
    best = None
    rtn_error = None
    for k in range(n_grid):
        alpha = k / n_grid
        s = x.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales' range on 1, as llm-awq does
        q = quantize_rtn(w * s[None, :], bits, group_size, symmetric)
        err = output_error(w, dequantize(q) / s[None, :], h)
        if k == 0:
            rtn_error = err
        if best is None or err < best.error:
            best = AwqResult(q, s, alpha, err, 0.0)
    best.rtn_error = rtn_error
    return best
