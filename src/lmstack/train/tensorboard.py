"""Where a run's scalars go besides metrics.jsonl: TensorBoard event files and, optionally, Weights & Biases.

Both are off by default (LogConfig in lmstack.train.metrics switches them on) and both get exactly the numbers
that the JSONL row holds, under the same names, at the same step. Their packages are imported only when
switched on, and a missing one is a clear error naming the pip command, never a silent no-op.

Usage:
    sinks = open_sinks(LogConfig(tensorboard=True), "runs/x")      # -> [TensorBoardSink]
    for s in sinks:
        s.scalars(10, {"loss": 2.3, "lr": 1e-3}); s.histograms(10, model); s.close()
    tensorboard --logdir runs/x/tensorboard
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError


def finite_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The plottable part of a metrics row: real numbers that are finite (bools and strings are not curves)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _named_tensors(model):
    """(tag, CPU float tensor) of every trainable weight and its gradient. Sharded (DTensor) parameters of
    FSDP2 / tensor parallelism are skipped: gathering them is a collective that only rank 0 would enter."""
    for name, p in model.named_parameters():
        if hasattr(p, "placements"):
            continue
        if p.requires_grad or p.grad is not None:
            yield f"weights/{name}", p.detach().float().cpu()
            if p.grad is not None:
                yield f"grads/{name}", p.grad.detach().float().cpu()


class TensorBoardSink:
    """Event files in <out>/tensorboard/ through torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, log_dir: str | Path):
        try:
            # lazy: heavy (torch), which this module does not import at its top
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package itself
            raise LmstackError("log.tensorboard needs the tensorboard package: pip install tensorboard "
                               f"(or pip install 'lmstack[dev]'); import failed: {e}") from None
        self.dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run still leaves every logged point readable

    def histograms(self, step: int, model) -> None:
        for tag, t in _named_tensors(model):
            if t.numel() and bool(t.isfinite().all()):
                self.writer.add_histogram(tag, t, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run; the network is contacted only by wandb itself, and only when switched on."""

    def __init__(self, out_dir: str | Path, project: str, mode: str, name: str = ""):
        try:
            # lazy: optional extra (wandb)
            import wandb
        except ImportError:
            raise LmstackError("log.wandb needs the wandb package: pip install wandb "
                               "(or pip install 'lmstack[wandb]')") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(out_dir), name=name or Path(out_dir).name)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def histograms(self, step: int, model) -> None:
        self.run.log({tag: self.wandb.Histogram(t.numpy()) for tag, t in _named_tensors(model)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg, out_dir: str | Path) -> list:
    """The sinks a LogConfig switches on, for a run writing into out_dir."""
    sinks: list = []
    if cfg is None:
        return sinks
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(Path(out_dir) / "tensorboard"))
    if cfg.wandb:
        sinks.append(WandbSink(out_dir, cfg.wandb_project, cfg.wandb_mode))
    return sinks
