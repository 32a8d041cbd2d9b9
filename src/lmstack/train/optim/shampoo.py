"""Shampoo (Gupta et al. 2018; Anil et al. 2020 "Scalable Second Order Optimization") with Adam grafting.

For a matrix gradient G, Shampoo keeps Kronecker factors L = E[G G^T] and R = E[G^T G] and steps
along L^(-1/4) G R^(-1/4), an approximation of full-matrix AdaGrad (E[g g^T])^(-1/2) g that whitens
the gradient across rows and columns together instead of per entry as Adam does. With k
preconditioned sides each factor gets the root -1/(2k) (a side longer than max_precond_dim gets
none, so a matrix with one long side is preconditioned by its other factor alone with root -1/2).
MoE expert stacks (E, n, m) are batches of matrices, each with its own factors.

Choices, as in the scalable Shampoo papers:
- factors are EMAs (decay shampoo_beta); the inverse roots are recomputed by eigendecomposition
  every precondition_frequency steps with damping relative to the largest eigenvalue;
- grafting: the Shampoo direction is rescaled to the norm of the Adam direction (per matrix), so
  the step size per layer is Adam's and Shampoo only chooses the direction; this is what makes
  Shampoo reuse AdamW's learning rate;
- momentum (beta1, bias-corrected) on the grafted direction; decoupled weight decay;
- 1-D tensors, or matrices with no side short enough, take plain AdamW steps.

Usage:
    opt = Shampoo(model.parameters(), lr=1e-3, betas=(0.9, 0.95), precondition_frequency=10)
"""
from __future__ import annotations

import math

import torch

from lmstack.train.optim.base import ParamwiseOptimizer, adam_moments
from lmstack.train.optim.kronecker import full_grad, gram, inverse_root, like_param, precond_sides, rotate

SIDES = ("left", "right")


class Shampoo(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, shampoo_beta: float = 0.95, precondition_frequency: int = 10,
                 max_precond_dim: int = 1024, damping: float = 1e-6):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      shampoo_beta=shampoo_beta, precondition_frequency=precondition_frequency,
                                      max_precond_dim=max_precond_dim, damping=damping))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        g = full_grad(p)
        state = self.state[p]
        sides = [side for side, on in zip(SIDES, precond_sides(g.shape, group["max_precond_dim"])) if on]
        fresh = not state
        t = adam_moments(state, g)
        if fresh:
            for side in sides:
                state[f"factor_{side}"] = torch.zeros_like(gram(g, side))
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        adam_dir = g / (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        if sides:
            for side in sides:
                state[f"factor_{side}"].lerp_(gram(g, side), 1 - group["shampoo_beta"])
            if (t - 1) % group["precondition_frequency"] == 0:
                for side in sides:
                    state[f"root_{side}"] = inverse_root(state[f"factor_{side}"], 2 * len(sides), group["damping"])
            # the roots are symmetric, so rotating by them is multiplying each side by them
            direction = rotate(g, state.get("root_left"), state.get("root_right"))
            # grafting, per matrix (per expert for stacks): Shampoo's direction at Adam's step length
            dims = (-2, -1)
            scale = adam_dir.norm(dim=dims, keepdim=True) / direction.norm(dim=dims, keepdim=True).clamp(min=1e-30)
            direction = direction * scale
        else:
            direction = adam_dir
        m = state["exp_avg"]
        m.lerp_(direction, 1 - beta1)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(like_param(m, p), alpha=-group["lr"] / (1 - beta1**t))
