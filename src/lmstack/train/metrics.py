"""Run logging: JSONL metrics, TensorBoard when installed, a PNG loss curve, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the machine's peak. The peak is measured,
not assumed: a short calibration times square fp32 matmuls (or bf16 on CUDA) on this machine.

Usage:
    log = MetricsLogger("runs/x")
    log.log(step, {"loss": 2.3, "lr": 1e-3})
    peak = measure_matmul_peak()           # FLOP/s
    log.plot("runs/x/loss.png"); log.close()
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


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


class MetricsLogger:
    def __init__(self, out_dir: str | Path, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        self._file = open(self.path, "a", encoding="utf-8")
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **values}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def plot(self, path: str | Path, keys: tuple[str, ...] = ("loss", "val_loss")) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
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
        if self._tb is not None:
            self._tb.close()
