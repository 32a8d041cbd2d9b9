"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the
eigenbasis of Shampoo's preconditioner.

Shampoo's Kronecker factors L = E[G G^T] and R = E[G^T G] define a rotation (their eigenvectors
Q_L, Q_R) in which the gradient's second moment is close to diagonal. SOAP rotates the gradient
into that basis, G' = Q_L^T G Q_R, takes an ordinary Adam step there (where Adam's diagonal
assumption holds much better), and rotates the step back. The eigenbases are recomputed every
precondition_frequency steps; the factors are EMAs (decay shampoo_beta) updated every step.

Details and choices:
- the first moment lives in the original space (it is rotated each step, so a basis change never
  leaves it stale); the second moment lives in the rotated space. When the basis changes we carry
  it over as if the rotated coordinates were independent: V_new = (O * O) V_old along each side,
  O = Q_new^T Q_old (the paper instead re-sorts it after a power-iteration + QR refresh; a full
  eigh is cheap at the sizes this package trains on CPU);
- a side longer than max_precond_dim gets no rotation (identity), so a (vocab x d) embedding is only
  rotated along d; MoE expert stacks (E, n, m) get factors per expert; 1-D tensors take plain AdamW steps;
- weight decay is decoupled, as in AdamW.

Usage:
    opt = SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), precondition_frequency=10)
"""
from __future__ import annotations

import math

import torch

from lmstack.train.optim.base import ParamwiseOptimizer, adam_moments
from lmstack.train.optim.kronecker import eigh, full_grad, gram, like_param, precond_sides, rotate

SIDES = ("left", "right")


class SOAP(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, shampoo_beta: float = 0.95, precondition_frequency: int = 10,
                 max_precond_dim: int = 1024):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      shampoo_beta=shampoo_beta, precondition_frequency=precondition_frequency,
                                      max_precond_dim=max_precond_dim))

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
        for side in sides:
            state[f"factor_{side}"].lerp_(gram(g, side), 1 - group["shampoo_beta"])
        if sides and (t - 1) % group["precondition_frequency"] == 0:
            self._refresh_basis(state, sides)
        left, right = state.get("basis_left"), state.get("basis_right")
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        g_rot = rotate(g, left, right)
        v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        update = rotate(rotate(m, left, right) / denom, left, right, back=True)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(like_param(update, p), alpha=-group["lr"] / (1 - beta1**t))

    @staticmethod
    def _refresh_basis(state: dict, sides: list[str]) -> None:
        v = state["exp_avg_sq"]
        for side in sides:
            _, q_new = eigh(state[f"factor_{side}"])
            q_old = state.get(f"basis_{side}")
            if q_old is not None:
                # carry the second moment into the new basis: new coordinate a mixes old ones k with
                # weights O[a, k]^2, O = Q_new^T Q_old (rows of O are unit vectors, so mass is kept)
                mix = (q_new.mT @ q_old).square_()
                v = mix @ v if side == "left" else v @ mix.mT
            state[f"basis_{side}"] = q_new
        state["exp_avg_sq"].copy_(v)
