"""What lmstack's hand-written optimizers share: the step() boilerplate and Adam's two moments.

torch.optim.Optimizer leaves closure handling and the walk over parameters to each subclass; doing it
once here keeps every optimizer file down to its own update rule.

Usage:
    class SignSGD(ParamwiseOptimizer):
        def _update(self, p, group):          # called for every parameter that has a gradient
            p.add_(p.grad.sign(), alpha=-group["lr"])
"""
from __future__ import annotations

import torch


class ParamwiseOptimizer(torch.optim.Optimizer):
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is not None:
                self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise TypeError(f"{type(self).__name__} must define _update(p, group) or _group_step(group)")


def adam_moments(state: dict, like: torch.Tensor) -> int:
    """Create Adam's first and second moments (shaped like `like`) on first use; count and return the step."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(like)
        state["exp_avg_sq"] = torch.zeros_like(like)
    state["step"] += 1
    return state["step"]
