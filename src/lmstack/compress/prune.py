"""Unstructured and 2:4 pruning of one weight: magnitude, Wanda and SparseGPT. Each returns the pruned weight and
its mask (True = kept).

- magnitude: drop the smallest |W|.
- Wanda (Sun et al. 2023): drop the smallest |W_ij| * ||X_j||_2, compared within each output row. A weight
  on a loud input channel matters more than its size alone says; no weight update.
- SparseGPT (Frantar & Alistarh 2023): the OBS sweep GPTQ uses (gptq.obs_sweep), with "set to 0 or keep"
  instead of rounding: the pruned weights' error is spread over the columns not yet visited. Per block of 128
  columns, each row drops its weights with the smallest w^2 / [U]_jj^2 (the OBS saliency with the current
  inverse Hessian); 2:4 chooses per run of 4 columns when the sweep reaches it.

Sparsity is per output row for all three (each row keeps the same count), so the methods differ only in
which weights they drop. 2:4 (semi-structured): in every run of 4 consecutive input columns of a row exactly
2 are zero, the pattern sparse tensor cores accelerate.

Usage:
    from lmstack.compress.prune import prune_magnitude, prune_wanda, prune_sparsegpt
    r = prune_wanda(w, stats[name].l2_norm, sparsity=0.5)        # r.weight (O, I), r.mask (bool)
    r = prune_sparsegpt(w, stats[name].hessian, pattern="2:4")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.compress.gptq import BLOCK_SIZE, obs_sweep, prepare_hessian
from lmstack.errors import LmstackError

PATTERNS = ("unstructured", "2:4")


@dataclass
class PruneResult:
    weight: torch.Tensor  # (O, I) fp32, zeros where pruned
    mask: torch.Tensor    # (O, I) bool, True = kept

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


def _check(w: torch.Tensor, sparsity: float, pattern: str) -> None:
    if w.dim() != 2:
        raise LmstackError(f"expected a 2-D weight (out_features, in_features); got shape {tuple(w.shape)}")
    if pattern not in PATTERNS:
        raise LmstackError(f"unknown sparsity pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern == "2:4":
        if w.shape[1] % 4:
            raise LmstackError(f"2:4 sparsity needs in_features divisible by 4; got {w.shape[1]}")
    elif not 0.0 <= sparsity < 1.0:
        raise LmstackError(f"sparsity must be in [0, 1); got {sparsity}")


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """True for the weights to keep: per row the (1 - sparsity) highest scores, or 2 of every 4 columns."""
    o, i = scores.shape
    if pattern == "2:4":
        runs = scores.reshape(o, i // 4, 4)
        drop = runs.topk(2, dim=2, largest=False).indices
        mask = torch.ones_like(runs, dtype=torch.bool).scatter_(2, drop, False)
        return mask.reshape(o, i)
    k = int(i * sparsity)  # per row
    mask = torch.ones(o, i, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return mask


def prune_magnitude(w: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured") -> PruneResult:
    _check(w, sparsity, pattern)
    w = w.detach().float()
    mask = keep_mask(w.abs(), sparsity, pattern)
    return PruneResult(w * mask, mask)


def prune_wanda(w: torch.Tensor, l2_norm: torch.Tensor, sparsity: float = 0.5,
                pattern: str = "unstructured") -> PruneResult:
    """Wanda: scores |W_ij| * ||X_j||_2 (l2_norm: calibration.LayerStats.l2_norm, shape (I,))."""
    _check(w, sparsity, pattern)
    if l2_norm.shape != (w.shape[1],):
        raise LmstackError(f"input norms shape {tuple(l2_norm.shape)} does not match in_features {w.shape[1]}")
    w = w.detach().float()
    mask = keep_mask(w.abs() * l2_norm.float()[None, :], sparsity, pattern)
    return PruneResult(w * mask, mask)


def prune_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured",
                    damp: float = 0.01, block_size: int = BLOCK_SIZE) -> PruneResult:
    """SparseGPT against the input Hessian h (I, I): prune and update the remaining weights."""
    _check(w, sparsity, pattern)
    w, u = prepare_hessian(w, h, damp)
    if pattern == "2:4":
        block_size = max(4, block_size - block_size % 4)  # runs of 4 never straddle a block
    mask = torch.ones_like(w, dtype=torch.bool)
    d = torch.diag(u)

    def pick(col: int, wb: torch.Tensor, j: int, full: torch.Tensor) -> torch.Tensor:
        if pattern == "2:4":
            if col % 4 == 0:  # a new run: choose its 2 zeros from the values as updated so far
                saliency = wb[:, j:j + 4].square() / d[col:col + 4].square()[None, :]
                mask[:, col:col + 4] = keep_mask(saliency, 0.5, "2:4")
        elif j == 0:  # a new block: choose its zeros per row from the block's current values
            n = wb.shape[1]
            saliency = wb.square() / d[col:col + n].square()[None, :]
            mask[:, col:col + n] = keep_mask(saliency, sparsity)
        return wb[:, j] * mask[:, col]

    weight = obs_sweep(w, u, block_size, pick)
    return PruneResult(weight * mask, mask)
