"""Muon (Jordan et al. 2024; the modded-nanogpt speedrun optimizer): orthogonalised momentum for the
matrices of the blocks, AdamW for everything else, in one optimizer object.

For a weight matrix W with momentum M, Muon replaces M by the nearest semi-orthogonal matrix
U V^T (M = U S V^T), i.e. every singular direction of the update moves by the same amount. Rare but
useful directions, which get small singular values from SGD or Adam, are amplified. U V^T is
computed without an SVD by a Newton-Schulz iteration on X = M / ||M||_F:
    X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)
The quintic's coefficients are chosen to push small singular values up fast (slope a = 3.4 at 0)
rather than to converge: after 5 steps every singular value sits in roughly [0.7, 1.2], which
trains as well as the exact U V^T at a fraction of the cost. The update is scaled by
sqrt(max(1, rows / cols)), so that tall matrices (fan_out > fan_in) get an update RMS like square ones.

Embeddings, the LM head, norms, biases and routers are not matrices in this sense (their rows are
looked up, or they are vectors), so they take AdamW steps; param groups with use_muon=False.
MoE expert stacks (E, out, in) are orthogonalised per expert (the iteration is batched).

Usage:
    groups = param_groups(model, cfg, lr=3e-3, muon_lr=0.02)     # lmstack.train.optim.param_groups
    opt = Muon(groups, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95))
    X = orthogonalize(torch.randn(64, 192))                      # singular values in ~[0.7, 1.2]
"""
from __future__ import annotations

import math

import torch

from lmstack.errors import LmstackError
from lmstack.train.optim.base import ParamwiseOptimizer, adam_moments

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of the last two dims of g (batched over leading dims) by quintic Newton-Schulz."""
    a, b, c = _NS_COEFFS
    # bf16 halves the cost on GPUs and the iteration tolerates it; on CPU bf16 matmul is far slower
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation so that A = X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # all singular values <= 1, inside the basin
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 use_muon: bool = False):
        """Groups with use_muon=True take Muon steps (lr, momentum, nesterov, ns_steps, weight_decay);
        the others take AdamW steps (lr, betas, eps, weight_decay). use_muon is the default for groups
        that do not say."""
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, betas=betas, eps=eps, use_muon=use_muon))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            names = group.get("names") or [f"#{i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                if p.dim() < 2:
                    raise LmstackError(f"Muon needs matrices, but parameter {name} has shape {tuple(p.shape)}; "
                                       "put it in a group with use_muon=False (AdamW)")

    def _group_step(self, group: dict) -> None:
        (self._muon_step if group["use_muon"] else self._adamw_step)(group)

    def _muon_step(self, group: dict) -> None:
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - beta)
            update = g.lerp(buf, beta) if group["nesterov"] else buf
            update = orthogonalize(update, group["ns_steps"])
            scale = math.sqrt(max(1.0, p.size(-2) / p.size(-1)))
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            t = adam_moments(state, p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
