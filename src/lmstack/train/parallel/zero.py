"""ZeRO-1: shard the optimizer state across data-parallel ranks with torch's ZeroRedundancyOptimizer.

Gradients are still all-reduced by DDP (ddp.py). Each rank then updates only the parameters it owns
(ZeRO partitions them greedily by size, so each rank holds about 1/N of the Adam moments) and
broadcasts them to the others. For AdamW that removes 8 of the 16 bytes per fp32 parameter that a
DDP rank holds, times (N-1)/N.

The optimizer is first built normally, so its class, parameter groups (e.g. no weight decay for
norms and biases) and defaults are exactly what a single process would use; ZeRO then rebuilds the
same optimizer over each rank's share.

Usage:
    opt = zero_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    loss.backward(); opt.step()
    opt.consolidate_state_dict(to=0)          # on every rank, before state_dict() on rank 0
"""
from __future__ import annotations

import inspect

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from lmstack.errors import LmstackError


def _constructor_defaults(cls: type, defaults: dict) -> dict:
    """The defaults the constructor takes. Some keys are set by the class itself, not passed in
    (AdamW records decoupled_weight_decay=True but does not accept it), so passing them back would fail."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def zero_optimizer(optimizer: torch.optim.Optimizer) -> ZeroRedundancyOptimizer:
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer
    if any(optimizer.state.values()):
        raise LmstackError("ZeRO-1 must wrap a fresh optimizer, before its first step (this one already has state)")
    groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    cls = type(optimizer)
    try:
        # The class is re-instantiated per rank with `defaults` as keyword arguments.
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **_constructor_defaults(cls, optimizer.defaults))
    except TypeError as e:
        raise LmstackError(f"distributed.strategy='zero1' cannot rebuild {type(optimizer).__name__} per rank: {e}; "
                           "its constructor must accept its `defaults` as keyword arguments") from None
