"""Run logging: JSONL metrics (always), TensorBoard / Weights & Biases when LogConfig switches them on,
a PNG loss curve, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the machine's peak. The peak is measured,
not assumed: a short calibration times square fp32 matmuls (or bf16 on CUDA) on this machine.

Usage:
    log = MetricsLogger("runs/x", log=LogConfig(tensorboard=True), model=model)   # --log.tensorboard true
    log.log(step, {"loss": 2.3, "lr": 1e-3})      # one JSONL row; the same scalars in runs/x/tensorboard/
    peak = measure_matmul_peak()           # FLOP/s (matmul_peak(): once per process, device and threads)
    log.plot("runs/x/loss.png"); log.close()
    rows = RunLog("runs/clip"); rows({"step": 25, "loss": 1.9})   # a fresh metrics.jsonl, one line per row
"""
from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
import time
from typing import Any, Literal

import torch

from lmstack.runtime.validation import check_choices, need
from lmstack.train.tensorboard import finite_scalars, open_sinks


@dataclass
class LogConfig:
    """Where a training run's metrics go besides metrics.jsonl (which is always written)."""

    tensorboard: bool = False
    """Also write every logged scalar (losses, lr, grad norm, tokens/s, eval metrics) as TensorBoard event files
    into <out>/tensorboard/ (needs the tensorboard package). View: tensorboard --logdir <out>/tensorboard."""
    histograms: bool = False
    """With tensorboard or wandb: also log weight (and, where present, gradient) histograms."""
    histogram_every: int = 100
    """Steps between histogram snapshots (the first logged step always gets one)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`; imported only when on)."""
    wandb_project: str = "lmstack"
    """The W&B project name."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """online syncs as it runs; offline writes <out>/wandb/ for a later `wandb sync`."""

    def __post_init__(self):
        check_choices(self)
        need(self.histogram_every >= 1, f"log.histogram_every must be >= 1, got {self.histogram_every}")


def measure_matmul_peak(device: str | torch.device = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of n×n matmuls on `device` (fp32 on CPU, bf16 on CUDA), best of a short run."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume depends on it)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = 0.0
    deadline = time.perf_counter() + seconds
    a @ b  # warm up
    while best == 0.0 or time.perf_counter() < deadline:  # at least one timed matmul, even on a busy machine
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


_PEAKS: dict[tuple[str, int], float] = {}


def matmul_peak(device: str | torch.device = "cpu") -> float:
    """measure_matmul_peak, measured once per process for each device and thread count: a sweep, a scaling grid or
    a test session trains many short runs in one process, and each would spend half a second re-measuring the same
    machine."""
    key = (str(torch.device(device)), torch.get_num_threads())
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_peak(device)
    return _PEAKS[key]


class RunLog:
    """A fresh metrics.jsonl in a run directory: emptied when made, then one JSON line per call. The plain row
    writer of the small trainers (CLIP, video, diffusion); MetricsLogger adds sinks and appends across resumes."""

    def __init__(self, out_dir: str | Path, filename: str = "metrics.jsonl"):
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")  # a rerun into the same directory starts a new log

    def __call__(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class MetricsLogger:
    """One JSONL row per log() call, and the same finite scalars to every sink `log` switches on.

    model: the module whose weights the histograms show (log.histograms); None = no histograms."""

    def __init__(self, out_dir: str | Path, filename: str = "metrics.jsonl", log: LogConfig | None = None,
                 model: torch.nn.Module | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        self.cfg = log or LogConfig()
        self.sinks = open_sinks(self.cfg, self.dir)  # before the JSONL opens: a missing package fails first
        self._file = open(self.path, "a", encoding="utf-8")
        self.history: list[dict[str, Any]] = []
        self.model = model if self.cfg.histograms else None
        self._last_hist: int | None = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **values}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if not self.sinks:
            return
        scalars = finite_scalars(values)
        for sink in self.sinks:
            sink.scalars(step, scalars)
        if self.model is not None and (self._last_hist is None or step - self._last_hist >= self.cfg.histogram_every):
            self._last_hist = step
            for sink in self.sinks:
                sink.histograms(step, self.model)

    def plot(self, path: str | Path, keys: tuple[str, ...] = ("loss", "val_loss")) -> Path | None:
        # lazy: heavy (matplotlib), which this module does not import at its top
        import matplotlib

        matplotlib.use("Agg")
        # lazy: heavy (matplotlib), which this module does not import at its top
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("val") else None, markersize=3)
                drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
