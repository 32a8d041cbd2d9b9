"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam with a per-tensor trust ratio.

For each tensor, the Adam direction plus decoupled weight decay,
    u = m_hat / (sqrt(v_hat) + eps) + wd * w,
is rescaled so that its norm is proportional to the weight's norm:
    w = w - lr * (||w|| / ||u||) * u.
So every layer moves by the same *relative* amount, lr, whatever the scale of its gradients. That
is what lets BERT train with batch 32k without per-layer LR tuning. The trust ratio is clipped at
max_trust_ratio, and is 1 when either norm is 0 (a zero-initialised bias takes a plain Adam step).

Usage:
    opt = Lamb(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
"""
from __future__ import annotations

import torch

from lmstack.train.optim.base import ParamwiseOptimizer, adam_moments


class Lamb(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_trust_ratio: float = 10.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_trust_ratio=max_trust_ratio))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        g = p.grad
        state = self.state[p]
        t = adam_moments(state, p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
        if group["weight_decay"]:
            update.add_(p, alpha=group["weight_decay"])
        w_norm, u_norm = p.norm(), update.norm()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if group["max_trust_ratio"]:
            ratio = ratio.clamp(max=group["max_trust_ratio"])
        p.add_(update * ratio, alpha=-group["lr"])
