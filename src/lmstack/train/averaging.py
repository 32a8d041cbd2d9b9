"""Averaged weights: EMA, stochastic weight averaging (SWA) and checkpoint averaging.

- EMA keeps shadow = decay * shadow + (1 - decay) * weights after every step (Polyak averaging).
- SWA (Izmailov et al. 2018) keeps the equal-weight mean of the weights seen every `every` steps
  once averaging starts.
- Checkpoint averaging (Vaswani et al. 2017; the "last K checkpoints" trick) averages the model
  weights stored in several checkpoint directories.
Each produces a plain state dict that can be swapped into the model for evaluation.

Usage:
    ema = EMA(model, decay=0.999); ema.update(model)
    swa = SWA(model); swa.update(model)
    with swapped(model, ema.state): val = evaluate(model)
    avg = average_checkpoints([dir1, dir2, dir3])
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from lmstack.model.hf_io import load_model


def _float_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in _float_params(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in _float_params(model).items():
            self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)


class SWA:
    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self.state = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in _float_params(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.count += 1
        for k, v in _float_params(model).items():
            self.state[k].add_(v.detach().float() - self.state[k], alpha=1.0 / self.count)


@contextlib.contextmanager
def swapped(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Temporarily load `state` (a subset of the model's state dict) into the model."""
    backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}
    model.load_state_dict({k: v.to(backup[k].dtype) for k, v in state.items()}, strict=False)
    try:
        yield model
    finally:
        model.load_state_dict(backup, strict=False)


def average_checkpoints(model_dirs: Iterable) -> dict[str, torch.Tensor]:
    """Element-wise mean of the weights of several model directories (same config)."""

    total: dict[str, torch.Tensor] | None = None
    n = 0
    for d in model_dirs:
        state = load_model(d).state_dict()
        if total is None:
            total = {k: v.detach().clone().float() for k, v in state.items()}
        else:
            for k, v in state.items():
                total[k] += v.float()
        n += 1
    if not n:
        raise ValueError("no checkpoints to average")
    return {k: v / n for k, v in total.items()}
