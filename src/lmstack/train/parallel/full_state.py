"""Whole (unsharded) model and optimizer states out of, and back into, a model of any strategy.

Saving gathers: FSDP2 shards and tensor-parallel slices are DTensors, and torch's
`get_model_state_dict(full_state_dict=True, cpu_offload=True)` all-gathers each one into a full CPU
tensor on rank 0 (other ranks get {}), under the plain Transformer's key names (no "module." or
wrapper prefixes). So `lmstack.save_model(model, dir, state_dict=...)` writes a directory that a
single process loads with `lmstack.load_model`.

The optimizer state uses one format for every strategy: torch.distributed.checkpoint's, keyed by
parameter name ({"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}). A ZeRO-1
optimizer's state is first consolidated on rank 0 and renamed from its parameter indices, so a run
saved under one strategy can resume under another (the moments are whole tensors either way).

Every function here is collective: call it on all ranks.

Usage:
    state = full_state_dict(model)                       # rank 0: {name: CPU tensor}; others: {}
    if is_main_process(): lmstack.save_model(raw_model, out, state_dict=state)
    load_full_state_dict(model, lmstack.load_model(out).state_dict())     # every rank passes it
    opt_state = full_optimizer_state_dict(model, optimizer)
    load_full_optimizer_state_dict(model, optimizer, opt_state)
    ema = gather_full(ema_state)       # any nested dict/list of (possibly sharded) tensors -> whole CPU tensors
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from lmstack.errors import LmstackError
from lmstack.train.parallel import setup

# Gather to rank 0's CPU memory, the only place the whole model must fit.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank passes the whole state and keeps its own shard of it.
_SCATTER = StateDictOptions(full_state_dict=True, strict=True)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state as CPU tensors with the plain model's names, on rank 0 ({} elsewhere)."""
    if not setup.is_initialized():
        return {k: v.detach().cpu() for k, v in _inner(model).state_dict().items()}
    state = get_model_state_dict(_inner(model), options=_GATHER)
    return state if setup.is_main_process() else {}


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a whole state dict (e.g. from lmstack.load_model) into a possibly sharded model; each rank
    keeps only its shard. Every rank must pass the full state."""
    set_model_state_dict(_inner(model), {k: v.detach().cpu() for k, v in state.items()}, options=_SCATTER)


def gather_full(tree: Any) -> Any:
    """A copy of a nested dict/list/tuple in which every DTensor (FSDP2 shard, TP slice) is replaced by the
    whole tensor on the CPU, e.g. EMA or SWA weights kept beside a sharded model. Collective: every rank
    must call it, and every rank gets the whole result."""
    if isinstance(tree, DTensor):
        tree = tree.full_tensor()  # a replicated DTensor gives back its own local tensor here
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)  # a copy even on the CPU, so later updates do not show
    if isinstance(tree, dict):
        return {k: gather_full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v) for v in tree)
    return tree


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (the order its integer indices follow)."""
    names = {id(p): n for n, p in _inner(model).named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise LmstackError(f"the optimizer holds {len(missing)} parameter(s) that are not in the model; "
                           "save their state separately")
    return [names[id(p)] for p in order]


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, on rank 0 ({} elsewhere)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        if not setup.is_main_process():
            return {}
        indexed = optimizer.state_dict()
        names = _param_names(model, optimizer)
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
        state = {names[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in indexed["state"].items()}
        return {"state": state, "param_groups": groups}
    state = get_optimizer_state_dict(_inner(model), optimizer, options=_GATHER)
    return state if setup.is_main_process() else {}


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Load a name-keyed whole optimizer state (from full_optimizer_state_dict) on every rank."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
        # ZeroRedundancyOptimizer.load_state_dict edits the dict it is given; hand it a copy.
        indexed = {"state": {index[n]: copy.copy(s) for n, s in state["state"].items()}, "param_groups": groups}
        optimizer.load_state_dict(indexed)
        return
    set_optimizer_state_dict(_inner(model), optimizer, state, options=_SCATTER)
