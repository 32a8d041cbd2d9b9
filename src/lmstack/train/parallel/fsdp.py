"""FSDP2 (`fully_shard`, the ZeRO-3 equivalent): parameters, gradients and optimizer state are sharded
across the data-parallel ranks; each block's full weights exist only while it runs.

Every Transformer block becomes its own FSDP unit, then the root (embeddings, final norm, head) a
last one, as torchtitan does: a block's parameters are all-gathered just before its forward (and
again before its backward) and freed right after, and its gradients are reduce-scattered as soon as
they are ready. Parameters become DTensors sharded on dim 0; the optimizer then only ever sees, and
keeps state for, this rank's 1/N slice.

With activation checkpointing, each block's forward is recomputed in the backward pass (the model's
own `checkpoint_blocks` switch, which distributed.place_model sets from distributed.activation_checkpointing
before sharding; FSDP2 skips its forward hooks during the recompute, so nothing is gathered twice).

Blocks shared across layers (ALBERT-style n_unique_layers) run several times per forward; they are
left in the root unit instead of being wrapped on their own.

Usage:
    model = apply_fsdp(model, mesh)                                   # mesh: 1-D DeviceMesh of the dp ranks
    model.set_requires_gradient_sync(False)                           # accumulate without reduce-scatter
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard


def apply_fsdp(model: torch.nn.Module, mesh) -> torch.nn.Module:
    shared = getattr(model.config, "n_unique_layers", 0) not in (0, model.config.n_layers)
    if not shared:
        last = len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            # The last block's weights are needed again at once by the backward pass; keeping them
            # gathered saves one all-gather per step (torchtitan does the same).
            fully_shard(block, mesh=mesh, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh)
    return model
