"""DDP: every rank holds the whole model and optimizer; gradients are averaged by bucketed all-reduce
during the backward pass, overlapping communication with the rest of backward.

Also the gradient side of ZeRO-1, whose optimizer sharding lives in zero.py.

Usage:
    model = apply_ddp(model, device, find_unused_parameters=False)
    with model.no_sync(): loss.backward()      # gradient accumulation without communication
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    # DDP broadcasts rank 0's weights in its constructor, so all replicas start equal.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
