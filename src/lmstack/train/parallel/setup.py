"""Process-group setup from torchrun's environment, the device mesh, and the few collectives the trainer needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process; a plain
`python` run sets none of them, and then everything here degrades to a single process (rank 0 of 1)
without creating a process group, so the same training code runs in both places.

Ranks are laid out on a 2-D mesh (dp, tp): ranks r*tp .. r*tp+tp-1 form tensor-parallel group r, so
the ranks that split one layer are neighbours (on one node, where the links are fastest).

Usage:
    rank, world_size, device = init_distributed(cfg)     # cfg: DistributedConfig
    loss = all_reduce_mean(loss)                         # float or tensor, mean over all ranks
    if is_main_process(): save(...)
    barrier(); cleanup()
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lmstack.errors import LmstackError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_backend(backend: str) -> str:
    """auto -> nccl when CUDA is present, else gloo; nccl without CUDA is refused."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LmstackError("distributed.backend='nccl' needs CUDA GPUs; none is visible. Use backend='gloo' on CPU")
    return backend


def init_distributed(cfg) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Joins the process group torchrun described; a plain run is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():  # e.g. set up by a test harness already
        backend = dist.get_backend()
        return dist.get_rank(), dist.get_world_size(), _device_for(backend)
    if not launched_by_torchrun():
        return 0, 1, _device_for(resolve_backend(cfg.backend))
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise LmstackError(f"incomplete torchrun environment: {', '.join(missing)} not set; launch with torchrun")
    backend = resolve_backend(cfg.backend)
    device = _device_for(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def _device_for(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a run; safe when none was created)."""
    if is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    return _device_for(dist.get_backend()) if is_initialized() else torch.device("cpu")


def all_reduce_mean(value):
    """Mean of a float or tensor over all ranks (returned as the same kind); identity in a single process."""
    if not is_initialized():
        return value
    is_tensor = torch.is_tensor(value)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    original = t.device
    t = t.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = (t / dist.get_world_size()).to(original)
    return t if is_tensor else float(t)


def resolve_tp_size(tp_size: int, ws: int) -> int:
    """tp_size 0 means every rank; otherwise it must divide the world size."""
    tp = tp_size or ws
    if ws % tp:
        raise LmstackError(f"distributed.tp_size={tp_size} must divide the world size {ws} "
                           f"(choose one of {', '.join(str(d) for d in range(1, ws + 1) if ws % d == 0)})")
    return tp


def device_mesh(tp: int, device: torch.device):
    """The (dp, tp) DeviceMesh over all ranks; tp=1 gives a pure data-parallel mesh."""

    ws = world_size()
    return init_device_mesh(device.type, (ws // tp, tp), mesh_dim_names=("dp", "tp"))


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank, so sharding starts from one set of weights
    whatever each process's RNG did (DDP does the same in its constructor)."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            moved = t.data.to(_collective_device())
            dist.broadcast(moved, src=src)
            if moved is not t.data:
                t.data.copy_(moved)


def data_parallel_info(tp_size: int = 1) -> tuple[int, int]:
    """(dp_rank, dp_size): which slice of the global batch this rank reads. Ranks of one tensor-parallel
    group must read the same rows, so with tensor parallelism only every tp-th rank gets new data."""
    ws = world_size()
    tp = resolve_tp_size(tp_size, ws)
    return rank() // tp, ws // tp
