"""Learning-rate schedules: a multiplier of each param group's base LR, as a pure function of the step.

Every schedule starts with a linear warmup from 1/warmup_steps to 1 over warmup_steps steps (Adam's
second-moment estimates are noisy at the start, and full-size steps then can diverge). After it:
- cosine: half a cosine from 1 down to min_lr_ratio at total_steps (GPT-3, Chinchilla);
- linear: a straight line from 1 down to min_lr_ratio at total_steps;
- wsd (warmup-stable-decay, MiniCPM / Hägele et al. 2024): flat at 1, then the final
  decay_fraction of the run decays to min_lr_ratio (shape: linear, 1-sqrt or cosine). The stable
  phase can be continued from any checkpoint, and the short decay recovers the cosine loss;
- inverse_sqrt: sqrt(warmup_steps / (step + 1)) (the original Transformer's "Noam" schedule; it has
  no end point, so total_steps and min_lr_ratio do not change it);
- constant: 1.
Steps past total_steps keep the final value. A pure function of (step, total_steps) needs no state
of its own, so resuming a checkpoint at step N resumes the schedule exactly.

Usage:
    from lmstack.train.optim import ScheduleConfig, lr_multiplier
    cfg = ScheduleConfig(name="wsd", warmup_steps=100, decay_fraction=0.2)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_multiplier(cfg, step, total_steps)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from lmstack.config import ConfigError
from lmstack.runtime.validation import check_choices, check_range, need


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "wsd", "linear", "inverse_sqrt", "constant"] = "cosine"
    """Schedule after warmup: cosine, wsd (warmup-stable-decay), linear, inverse_sqrt or constant."""
    warmup_steps: int = 100
    """Steps of linear warmup from ~0 to the peak LR (capped at total_steps)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine, linear, wsd)."""
    decay_fraction: float = 0.2
    """wsd: the final fraction of the run over which the LR decays."""
    decay_shape: Literal["linear", "sqrt", "cosine"] = "linear"
    """wsd: shape of the final decay: linear, sqrt (1 - sqrt(progress), Hägele et al.) or cosine."""

    def __post_init__(self) -> None:
        check_choices(self)
        check_range("warmup_steps", self.warmup_steps, low=0)
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0.0 < self.decay_fraction <= 1.0, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


def _ramp(progress: float, shape: str) -> float:
    """How far down the decay is, 0 (peak) .. 1 (min), for progress in [0, 1]."""
    if shape == "sqrt":
        return math.sqrt(progress)
    if shape == "cosine":
        return 0.5 * (1 - math.cos(math.pi * progress))
    return progress


def _between(start: int, step: int, total: int) -> float:
    return min(max((step - start) / max(total - start, 1), 0.0), 1.0)


def cosine(cfg: ScheduleConfig, step: int, total: int, warmup: int) -> float:
    return 1 - (1 - cfg.min_lr_ratio) * _ramp(_between(warmup, step, total), "cosine")


def linear(cfg: ScheduleConfig, step: int, total: int, warmup: int) -> float:
    return 1 - (1 - cfg.min_lr_ratio) * _between(warmup, step, total)


def wsd(cfg: ScheduleConfig, step: int, total: int, warmup: int) -> float:
    decay_start = max(warmup, total - round(cfg.decay_fraction * total))
    if step < decay_start:
        return 1.0
    return 1 - (1 - cfg.min_lr_ratio) * _ramp(_between(decay_start, step, total), cfg.decay_shape)


def inverse_sqrt(cfg: ScheduleConfig, step: int, total: int, warmup: int) -> float:
    return math.sqrt(max(warmup, 1) / (step + 1))


def constant(cfg: ScheduleConfig, step: int, total: int, warmup: int) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[ScheduleConfig, int, int, int], float]] = {
    "cosine": cosine, "wsd": wsd, "linear": linear, "inverse_sqrt": inverse_sqrt, "constant": constant,
}


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The LR multiplier at `step` (0-based) of a `total_steps` run: warmup, then SCHEDULES[cfg.name]."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[cfg.name](cfg, step, total_steps, warmup)
