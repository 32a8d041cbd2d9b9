"""GPTQ (Frantar et al. 2022): quantize a weight one input column at a time, spreading each column's rounding
error over the columns not yet quantized, so that the layer's output error on calibration inputs stays small.

The layer's squared output error is tr(dW H dW^T) with H = 2 X^T X / n (calibration.py). Optimal Brain
Surgeon says: after fixing column i to a value q, the best update of the remaining columns is
-(w_i - q) / [H^-1]_ii * [H^-1]_i,(i+1:), where H^-1 is the inverse Hessian of the columns still free. Those
successive inverses are the rows of the upper Cholesky factor U of H^-1 (so no inverse is recomputed), and:

- lazy batch updates: while the sweep is inside a block of 128 columns, each column's update touches only
  the block; the rest of the matrix receives the whole block's updates at once (one matmul), which is what
  makes it fast;
- dampening: H + damp * mean(diag H) * I keeps the Cholesky factorisation stable; a column whose input is
  always 0 (a dead channel) gets H_ii = 1 and weight 0;
- groups: a group's scale and zero are computed when the sweep reaches its first column, from the values
  as updated so far (blocks are aligned to groups so those values are final);
- act-order: columns in descending diag(H) order (the most active inputs first, while many columns remain
  to absorb their error); recorded in QuantizedWeight.perm. Codes and groups are in the sweep's order, so a
  format with a per-column group index (GPTQ's g_idx) has g_idx[perm[j]] = j // group_size.
- act-order with static groups (static_groups=True; AutoGPTQ's static_groups, compressed-tensors' actorder
  "weight"): the sweep still runs in diag(H) order, but the groups are the weight's own runs of group_size
  input columns, their scales and zeros fixed from the unquantized weight before the sweep. The result has
  no permutation (perm None): a plain grouped weight that any int4 kernel runs, at the cost of group
  parameters that do not see the error updates.

obs_sweep is the shared column sweep; SparseGPT (prune.py) runs it with a pruning rule instead of rounding.

Usage:
    from lmstack.compress.gptq import gptq_quantize
    qw = gptq_quantize(w, stats["blocks.0.attn.q_proj"].hessian, bits=4, group_size=128, act_order=True)
    w_hat = dequantize(qw)     # lmstack.compress.quantize_rtn
"""
from __future__ import annotations

from typing import Callable

import torch

from lmstack.compress.quantize_rtn import QuantizedWeight, check_group, decode, encode, group_params, pack_result
from lmstack.errors import LmstackError

BLOCK_SIZE = 128


def prepare_hessian(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w with dead columns zeroed, U): U the upper Cholesky factor of (H + damp * mean diag * I)^-1 (fp32)."""
    o, i = w.shape
    if h.shape != (i, i):
        raise LmstackError(f"Hessian shape {tuple(h.shape)} does not match the weight's in_features {i}")
    if not (torch.isfinite(h).all() and torch.isfinite(w).all()):
        raise LmstackError("the weight or the Hessian holds NaN or inf (diverged weights, or non-finite calibration "
                           "activations); nothing to quantize or prune against")
    if not damp > 0:
        raise LmstackError(f"damp must be > 0 (a fraction of the mean Hessian diagonal, e.g. 0.01); got {damp}")
    h = h.double().clone()
    w = w.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(i, dtype=h.dtype)
    try:
        # float64 for the factorisations: cheap at these sizes and no fp32 breakdown on near-singular Hessians
        chol = torch.linalg.cholesky(h)
        u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise LmstackError(f"the Hessian is not positive definite even with damp={damp}; raise damp or "
                           f"give more calibration tokens ({e})") from None
    return w, u.float()


def aligned_block(block: int, group: int | None) -> int:
    """A block size whose blocks each hold whole groups, or whose groups each start at a block start, so a
    group's parameters are computed from fully updated values."""
    if group is None or group % block == 0 or block % group == 0:
        return block
    return (block // group) * group if group < block else group


def obs_sweep(w: torch.Tensor, u: torch.Tensor, block: int,
              pick: Callable[[int, torch.Tensor, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The OBS column sweep with lazy batch updates. w (O, I) is updated in place; returns the chosen columns.

    pick(i, wb, j, w) returns the new value of column i (= block start + j) from the block's current
    columns wb (O, block) and the whole matrix w (current from the block's start on)."""
    o, n = w.shape
    out = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        wb = w[:, i1:i2].clone()
        ub = u[i1:i2, i1:i2]
        err = torch.zeros_like(wb)
        for j in range(i2 - i1):
            q = pick(i1 + j, wb, j, w)
            e = (wb[:, j] - q) / ub[j, j]
            wb[:, j:] -= e[:, None] * ub[j, j:][None, :]  # column j becomes q; later ones absorb the error
            out[:, i1 + j] = q
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]  # the block's errors reach the rest of the matrix in one matmul
    return out


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, act_order: bool = False, damp: float = 0.01,
                  block_size: int = BLOCK_SIZE, static_groups: bool = False) -> QuantizedWeight:
    """GPTQ of w (O, I) against the input Hessian h (I, I); returns the QuantizedWeight (codes in the sweep's
    column order, recorded in perm when act_order; in input order, perm None, with static_groups)."""
    if w.dim() != 2:
        raise LmstackError(f"expected a 2-D weight (out_features, in_features); got shape {tuple(w.shape)}")
    o, i = w.shape
    g = check_group(i, group_size, bits)
    if static_groups:
        return _static_groups(w, h, bits, g, symmetric, act_order, damp, block_size)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    w, u = prepare_hessian(w, h, damp)
    n_groups = i // g
    codes = torch.zeros(o, i)
    scales = torch.zeros(o, n_groups)
    zeros = None if symmetric else torch.zeros(o, n_groups)
    current: dict[str, torch.Tensor | None] = {}

    def pick(col: int, wb: torch.Tensor, j: int, full: torch.Tensor) -> torch.Tensor:
        if col % g == 0:  # first column of a group: its parameters, from the values as updated so far
            cols = wb[:, j:j + g] if j + g <= wb.shape[1] else full[:, col:col + g]
            current["scale"], current["zero"] = group_params(cols, bits, symmetric)
            scales[:, col // g] = current["scale"]
            if zeros is not None:
                zeros[:, col // g] = current["zero"]
        c = encode(wb[:, j:j + 1], current["scale"], current["zero"], bits)
        codes[:, col] = c[:, 0]
        return decode(c, current["scale"], current["zero"])[:, 0]

    obs_sweep(w, u, aligned_block(block_size, g), pick)
    return pack_result(codes, scales, zeros, bits, g, perm)


def _static_groups(w: torch.Tensor, h: torch.Tensor, bits: int, g: int, symmetric: bool, act_order: bool,
                   damp: float, block_size: int) -> QuantizedWeight:
    """GPTQ whose groups are fixed runs of input columns with parameters from the unquantized weight."""
    o, i = w.shape
    rows = w.detach().float().reshape(-1, g)  # each row of each input-order group, as quantize_rtn cuts them
    scale, zero = group_params(rows, bits, symmetric)
    scales = scale.reshape(o, i // g)
    zeros = None if zero is None else zero.reshape(o, i // g)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(i)
    w, u = prepare_hessian(w[:, perm], h[perm][:, perm], damp)
    codes = torch.zeros(o, i)

    def pick(col: int, wb: torch.Tensor, j: int, full: torch.Tensor) -> torch.Tensor:
        grp = int(perm[col]) // g  # the input column's own group
        z = None if zeros is None else zeros[:, grp]
        c = encode(wb[:, j:j + 1], scales[:, grp], z, bits)
        codes[:, perm[col]] = c[:, 0]  # back in input order
        return decode(c, scales[:, grp], z)[:, 0]

    obs_sweep(w, u, block_size, pick)
    return pack_result(codes, scales, zeros, bits, g, None)
