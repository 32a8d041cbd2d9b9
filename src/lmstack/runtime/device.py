"""Devices and dtypes: the one place that says what `device: auto` and `dtype: auto` mean.

"auto" picks CUDA when a GPU is visible and the CPU otherwise (MPS is never picked on its own; name it).
The inference dtype "auto" is bf16 on CUDA and fp32 everywhere else: on CPU a bf16 matmul is about 300x
slower than fp32 (DESIGN.md). Training precision (autocast, scalers) is lmstack.train.precision's job.

Usage:
    from lmstack.runtime.device import pick_device, resolve_device, resolve_dtype
    device = resolve_device("auto")                 # torch.device("cuda") or torch.device("cpu")
    dtype = resolve_dtype("auto", device)           # torch.bfloat16 on CUDA, torch.float32 on CPU
    name, dtype = pick_device("auto", "bf16")       # ("cpu", torch.bfloat16): the engine's arguments
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError

# user spellings -> torch attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; any other name must be one torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise LmstackError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N") from None


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else one of DTYPES' spellings."""
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if name not in DTYPES:
        raise LmstackError(f"dtype={name!r} is not allowed; choose auto or one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def pick_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """(device name, weight dtype) for the inference engine, both resolved from their 'auto'."""
    dev = resolve_device(device)
    return str(dev), resolve_dtype(dtype, dev)
