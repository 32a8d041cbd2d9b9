"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolated momentum.

    c = beta1 * m + (1 - beta1) * g          # what the update looks at
    p = p * (1 - lr * wd) - lr * sign(c)     # every entry moves by exactly lr (before decay)
    m = beta2 * m + (1 - beta2) * g          # a slower momentum is what is kept

One state tensor per parameter (Adam keeps two). Because every entry moves by +-lr, the update's
RMS is lr regardless of gradient scale, so Lion wants an LR 3-10x below AdamW's and a larger weight
decay for the same effective regularisation (the paper's advice).

Usage:
    opt = Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
"""
from __future__ import annotations

import torch

from lmstack.train.optim.base import ParamwiseOptimizer


class Lion(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        g = p.grad
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        update = torch.lerp(g, m, beta1).sign_()     # beta1 * m + (1 - beta1) * g
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr)
        m.lerp_(g, 1 - beta2)
