"""Gradient-norm clipping that works for every strategy.

torch.nn.utils.clip_grad_norm_ runs one fused norm over all gradients, which fails when some are
DTensors (tensor-parallel slices) and some plain tensors (replicated norms and embeddings). Here the
gradients are grouped by kind and by device mesh; each group's norm is computed by torch
(get_total_norm), a DTensor group's norm is made whole with full_tensor() (an all-reduce of the
partial sums), and the groups combine as sqrt(sum of squares). Under FSDP2 every gradient is a shard,
so this is one all-reduce; under DDP and ZeRO-1 gradients are whole already and nothing is sent.

Usage:
    norm = clip_grad_norm_(model.parameters(), max_norm=1.0)    # plain tensor, same on every rank
    p.grad.add_(distribute_like(torch.randn(p.shape, generator=g), p.grad))   # gradient noise, any strategy
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def total_grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, as a plain CPU-or-device tensor equal on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else g.device
        groups.setdefault(key, []).append(g)
    if not groups:
        return torch.zeros(())
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    norms = torch.stack([n.to(device, torch.float32) for n in norms])
    if math.isinf(norm_type):
        return norms.max()
    return norms.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale all gradients so their joint norm is at most max_norm; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    total = total_grad_norm(params, norm_type)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
    return total


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, identical on every rank, e.g. noise drawn from a generator seeded alike
    everywhere) laid out like `like`: this rank's shard when `like` is a DTensor, else `full` itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)
