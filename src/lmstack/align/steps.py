"""Loop pieces the alignment trainers share: device choice, shuffled batches, optimizer + schedule, one step.

Preference data are lists of rows, not packed token streams, so the pretraining Trainer's loader
does not fit; these few helpers reuse its optimizer and schedule registries (lmstack.train.optim,
configured by the same OptimizerConfig and ScheduleConfig as pretrain and finetune) and keep each
trainer's loop to what is specific to its loss.

Usage:
    from lmstack.align.steps import Stepper, batches, split_holdout
    stepper = Stepper.from_config(model, cfg)            # cfg.optim's optimizer + cfg.schedule over cfg.train.steps
    for step, rows in zip(range(cfg.train.steps), batches(train_rows, cfg.batch_size, cfg.train.seed)):
        loss = ...
        stats = stepper.step(loss, step)                 # backward, clip, optimizer step, LR update
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence, TypeVar

import torch

from lmstack.errors import LmstackError
from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier

T = TypeVar("T")


def batches(rows: Sequence[T], batch_size: int, seed: int = 0) -> Iterator[list[T]]:
    """Endless batches: each epoch is a fresh seeded shuffle; a short last batch is dropped unless it is all."""
    if not rows:
        raise LmstackError("no training rows")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    size = min(batch_size, len(rows))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [rows[j] for j in order[i:i + size]]


def split_holdout(rows: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held-out) by a seeded shuffle; the held-out part is at least one row when fraction > 0."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed + 7).shuffle(order)
    n = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def chunks(rows: Sequence[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(rows), size):
        yield list(rows[i:i + size])


class Stepper:
    """The optimizer `optim` names over the module's trainable parameters (lmstack.train.optim's groups: no
    decay on norms, biases and embeddings), its LR following `schedule` over `steps` optimizer steps."""

    def __init__(self, module: torch.nn.Module, optim: OptimizerConfig, steps: int,
                 schedule: ScheduleConfig | None = None, clip_grad_norm: float = 1.0):
        self.optimizer = build_optimizer(module, optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.lr, self.steps, self.clip = optim.lr, steps, clip_grad_norm
        self.schedule = schedule or ScheduleConfig()

    @classmethod
    def from_config(cls, module: torch.nn.Module, cfg, steps: int | None = None) -> "Stepper":
        """The Stepper an AlignConfig describes: cfg.optim, cfg.schedule over `steps` (default cfg.train.steps)
        optimizer steps, clipping at cfg.train.clip_grad_norm."""
        return cls(module, cfg.optim, cfg.train.steps if steps is None else steps, cfg.schedule,
                   cfg.train.clip_grad_norm)

    def step(self, loss: torch.Tensor, step: int) -> dict[str, float]:
        if not torch.isfinite(loss):
            raise LmstackError(f"loss became {float(loss)} at step {step}; lower lr or check the data")
        lr = self.lr * lr_multiplier(self.schedule, step, self.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr / self.lr
        loss.backward()
        if self.clip:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params
                                                               if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": norm}
