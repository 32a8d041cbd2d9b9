"""Scale-out with torch.distributed, launched by torchrun: DDP, FSDP2 (ZeRO-3), ZeRO-1 and tensor parallel.

One config picks the strategy; `parallelize` applies it to a plain Transformer and `wrap_optimizer`
adapts the optimizer. Without torchrun everything is a single process and these calls change
nothing, so the trainer's code is the same in both places.

| strategy | each rank holds                           | communication per step                      |
|----------|-------------------------------------------|---------------------------------------------|
| ddp      | whole model, grads, optimizer             | all-reduce of the gradients                 |
| zero1    | whole model and grads, 1/N of optimizer   | all-reduce grads, broadcast updated params  |
| fsdp2    | 1/N of params, grads and optimizer        | all-gather params per block, reduce-scatter |
| tp       | 1/tp of every attention/MLP projection    | 2 all-reduces per block, forward and back   |

With strategy="tp" and tp_size smaller than the world size, the ranks form a (dp, tp) mesh: tensor
parallel inside each group of tp_size ranks, FSDP2 across the groups (torchtitan's 2-D layout).

Usage (torchrun --nproc_per_node 2 -m lmstack.cli pretrain --distributed.strategy fsdp2 ...):
    cfg = DistributedConfig(strategy="fsdp2")
    rank, world_size, device = init_distributed(cfg)
    model = parallelize(Transformer(model_cfg), cfg, device)
    optimizer = wrap_optimizer(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), cfg)
    ...train...
    state = full_state_dict(model)                    # whole weights on rank 0, plain key names
    if is_main_process(): lmstack.save_model(raw_model, "out", state_dict=state)
    cleanup()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from lmstack.config import ConfigError
from lmstack.runtime.validation import check_choices
from lmstack.train.parallel import setup
from lmstack.train.parallel.full_state import (full_optimizer_state_dict, full_state_dict, gather_full,
                                               load_full_optimizer_state_dict, load_full_state_dict)
from lmstack.train.parallel.grads import clip_grad_norm_, distribute_like, total_grad_norm
from lmstack.train.parallel.memory import local_memory_bytes
from lmstack.train.parallel.setup import (all_reduce_mean, barrier, cleanup, init_distributed, is_main_process,
                                          launched_by_torchrun)
from lmstack.train.parallel.ddp import apply_ddp
from lmstack.train.parallel.fsdp import apply_fsdp
from lmstack.train.parallel.tensor_parallel import apply_tensor_parallel, check_tensor_parallel
from lmstack.train.parallel.zero import zero_optimizer

Strategy = Literal["none", "ddp", "fsdp2", "zero1", "tp"]

__all__ = ["DistributedConfig", "init_distributed", "place_model", "parallelize", "wrap_optimizer", "full_state_dict",
           "load_full_state_dict", "full_optimizer_state_dict", "load_full_optimizer_state_dict", "gather_full",
           "is_main_process", "barrier", "all_reduce_mean", "cleanup", "clip_grad_norm_", "total_grad_norm",
           "distribute_like", "data_parallel_info", "local_memory_bytes", "check_tensor_parallel",
           "launched_by_torchrun", "STRATEGIES"]


@dataclass
class DistributedConfig:
    strategy: Strategy = "none"
    """none (one process), ddp, fsdp2 (fully_shard, ZeRO-3), zero1 (DDP + sharded optimizer state),
    tp (tensor parallel)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto = nccl when CUDA is present, gloo on CPU."""
    tp_size: int = 0
    """strategy=tp: ranks each layer is split across; 0 = all ranks. A smaller divisor of the world size
    adds FSDP2 across the groups (2-D)."""
    activation_checkpointing: bool = False
    """Recompute each block's forward in the backward pass instead of storing its activations, in every
    strategy, one process included. The only switch for it (set before sharding under fsdp2)."""
    find_unused_parameters: bool = False
    """ddp/zero1: allow parameters that get no gradient in a step (slower; needed only for such models)."""
    timeout_s: int = 1800
    """Seconds a collective may wait before the process group gives up."""

    def __post_init__(self) -> None:
        check_choices(self, quoted=True)
        if self.strategy == "tp" and self.tp_size == 1:
            raise ConfigError("strategy='tp' with tp_size=1 splits nothing; use tp_size=0 (all ranks) or a "
                              "larger divisor of the world size, or strategy='fsdp2'/'ddp'")
        if self.tp_size < 0:
            raise ConfigError(f"tp_size must be >= 0 (0 = all ranks), got {self.tp_size}")
        if self.tp_size > 1 and self.strategy != "tp":
            raise ConfigError(f"tp_size={self.tp_size} needs strategy='tp', got strategy={self.strategy!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")


# ---- strategies: name -> function(model, cfg, device) -> model
def _none(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    return model


def _ddp(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    return apply_ddp(model, device, cfg.find_unused_parameters)


def _fsdp2(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    setup.broadcast_module(model)  # shard one set of weights, whatever each rank initialised
    return apply_fsdp(model, setup.device_mesh(1, device)["dp"])


def _tp(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    tp = setup.resolve_tp_size(cfg.tp_size, setup.world_size())
    check_tensor_parallel(model.config, tp)
    setup.broadcast_module(model)
    mesh = setup.device_mesh(tp, device)
    apply_tensor_parallel(model, mesh["tp"])
    if mesh["dp"].size() > 1:  # 2-D: FSDP2 over the data-parallel dimension, on top of TP
        return apply_fsdp(model, mesh["dp"])
    return model


STRATEGIES: dict[str, Callable[[torch.nn.Module, DistributedConfig, torch.device], torch.nn.Module]] = {
    "none": _none, "ddp": _ddp, "fsdp2": _fsdp2, "zero1": _ddp, "tp": _tp,
}


def place_model(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    """Move `model` to `device` and switch on activation checkpointing when cfg asks: what every run does,
    in one process or many. The one place that reads cfg.activation_checkpointing."""
    model = model.to(device)
    if cfg.activation_checkpointing and hasattr(model, "checkpoint_blocks"):
        model.checkpoint_blocks = True  # before sharding: FSDP2 then skips its hooks in the recompute
    return model


def parallelize(model: torch.nn.Module, cfg: DistributedConfig, device: torch.device) -> torch.nn.Module:
    """place_model, then apply cfg.strategy. Returns the model to train: a DDP wrapper, or the same module
    sharded in place (fsdp2, tp). In a single process only place_model applies."""
    model = place_model(model, cfg, device)
    if not setup.is_initialized():
        return model
    return STRATEGIES[cfg.strategy](model, cfg, device)


def wrap_optimizer(model: torch.nn.Module, optimizer_factory, cfg: DistributedConfig) -> torch.optim.Optimizer:
    """The optimizer for a parallelized model: optimizer_factory(model) (or an optimizer already built on
    the parallelized model's parameters); under zero1 it becomes a ZeroRedundancyOptimizer of the same
    class, parameter groups and defaults, holding state only for this rank's share of the parameters."""
    optimizer = optimizer_factory if isinstance(optimizer_factory, torch.optim.Optimizer) else optimizer_factory(model)
    if cfg.strategy == "zero1" and setup.is_initialized():
        return zero_optimizer(optimizer)
    return optimizer


def data_parallel_info(cfg: DistributedConfig) -> tuple[int, int]:
    """(dp_rank, dp_size): the data shard this rank reads and how many shards there are. Ranks of one
    tensor-parallel group read the same rows."""
    return setup.data_parallel_info(cfg.tp_size if cfg.strategy == "tp" else 1)
