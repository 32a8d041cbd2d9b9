"""Adafactor (Shazeer & Stern 2018): Adam-like scaling with factored second moments.

For a matrix G (n x m) Adafactor keeps only the row means r (n) and column means c (m) of the
squared gradients and rebuilds the second moment as the rank-1 estimate v_ij = r_i * c_j / mean(r),
which is exact when G^2 is rank 1 and minimises a KL-type error otherwise. State is O(n + m)
instead of Adam's O(n * m). Tensors with more dims (MoE expert stacks) are factored over their
last two dims; 1-D tensors keep a full second moment. The other pieces of the paper:
- an increasing second-moment decay beta2_t = 1 - t**(-decay_rate), so early steps average over
  the short history that exists (no bias correction needed: beta2_1 = 0);
- update clipping: u / max(1, RMS(u) / d), which replaces Adam's beta1 as the safeguard against
  stale second moments (beta1 = 0 by default, so no first moment is kept at all);
- optional relative step size min(lr, 1/sqrt(t)) and parameter scaling by max(1e-3, RMS(w)).
Weight decay is decoupled, as in AdamW.

Usage:
    opt = Adafactor(model.parameters(), lr=1e-2)                  # O(n + m) state per matrix
    opt = Adafactor(params, lr=1e-2, relative_step=True, scale_parameter=True)   # the T5 setting
"""
from __future__ import annotations

import torch

from lmstack.train.optim.base import ParamwiseOptimizer


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


class Adafactor(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.0, decay_rate: float = 0.8,
                 clip_threshold: float = 1.0, eps: tuple[float, float] = (1e-30, 1e-3), weight_decay: float = 0.0,
                 relative_step: bool = False, scale_parameter: bool = False):
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold,
                                      eps=eps, weight_decay=weight_decay, relative_step=relative_step,
                                      scale_parameter=scale_parameter))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        eps1, eps2 = group["eps"]
        g = p.grad
        factored = g.dim() >= 2
        state = self.state[p]
        if not state:
            state["step"] = 0
            if factored:  # zeros_like of the reductions, so a sharded (DTensor) grad gets DTensor state
                state["exp_avg_sq_row"] = torch.zeros_like(g.mean(dim=-1))
                state["exp_avg_sq_col"] = torch.zeros_like(g.mean(dim=-2))
            else:
                state["exp_avg_sq"] = torch.zeros_like(g)
            if group["beta1"]:
                state["exp_avg"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"]
        beta2t = 1.0 - t ** (-group["decay_rate"])
        g2 = g.square() + eps1  # eps1 keeps rsqrt finite where a row or column saw only zeros
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(g2.mean(dim=-1), 1 - beta2t)
            col.lerp_(g2.mean(dim=-2), 1 - beta2t)
            # v_ij = row_i * col_j / mean(row): rsqrt of it, as an outer product of two vectors
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = g * row_factor * col.rsqrt().unsqueeze(-2)
        else:
            v = state["exp_avg_sq"]
            v.lerp_(g2, 1 - beta2t)
            update = g * v.rsqrt()
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"]:
            state["exp_avg"].lerp_(update, 1 - group["beta1"])
            update = state["exp_avg"]
        lr = group["lr"]
        step_size = min(lr, t**-0.5) if group["relative_step"] else lr
        if group["scale_parameter"]:
            update = update * _rms(p).clamp(min=eps2)  # a tensor, so no host sync on GPU
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-step_size)
