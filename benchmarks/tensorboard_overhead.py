"""What `--log.tensorboard true` costs: the same short pretraining run with and without TensorBoard event files.

Both arms train the shakespeare_char recipe's model (4 layers, d_model 128) on Tiny Shakespeare for `steps`
steps, logging every `log_every` steps (denser than the recipe's 50, so the writer is stressed), with the same
seed, 1 torch thread, no checkpoints beyond the final one. Arms alternate (off, on, off, on, ...) so machine
load hits both alike; the median wall time of each is reported. A second pair of rows times one
MetricsLogger.log() call of 12 scalars alone (JSONL only vs JSONL + TensorBoard), median over many calls.

Usage:
    .venv/bin/python benchmarks/tensorboard_overhead.py            # -> benchmarks/results/tensorboard_overhead.json
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import result, write_result

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def train_seconds(out: Path, tensorboard: bool, steps: int, log_every: int) -> float:
    from lmstack.config import load_config
    from lmstack.train.metrics import LogConfig
    from lmstack.train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, ROOT / "recipes" / "shakespeare_char.yaml")
    cfg.out, cfg.data.text = str(out), str(TEXT)
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.eval_batches = steps, log_every, 0, 2
    cfg.train.progress, cfg.train.threads, cfg.train.seed = False, 1, 0
    cfg.log = LogConfig(tensorboard=tensorboard)
    start = time.perf_counter()
    pretrain(cfg, log=lambda *a: None)
    return time.perf_counter() - start


def log_call_seconds(tmp: Path, tensorboard: bool, calls: int = 300) -> float:
    from lmstack.train.metrics import LogConfig, MetricsLogger

    log = MetricsLogger(tmp, log=LogConfig(tensorboard=tensorboard))
    row = {f"metric_{i}": 1.0 / (i + 1) for i in range(12)}
    times = []
    for step in range(calls):
        t = time.perf_counter()
        log.log(step, row)
        times.append(time.perf_counter() - t)
    log.close()
    return statistics.median(times)


def main(steps: int = 120, log_every: int = 2, repeats: int = 5) -> None:
    if not TEXT.is_file():
        raise SystemExit(f"Tiny Shakespeare not found at {TEXT}")
    torch.set_num_threads(1)
    off, on = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats + 1):  # the first pair warms up imports and caches and is dropped
            for arm, times in (("off", off), ("on", on)):
                out = Path(d) / f"{arm}{i}"
                secs = train_seconds(out, arm == "on", steps, log_every)
                if i:
                    times.append(secs)
                shutil.rmtree(out)
        call_off = statistics.median(log_call_seconds(Path(d) / f"c_off{i}", False) for i in range(3))
        call_on = statistics.median(log_call_seconds(Path(d) / f"c_on{i}", True) for i in range(3))
    config = dict(machine="2 cores, shared", torch_threads=1, recipe="recipes/shakespeare_char.yaml", steps=steps,
                  log_every=log_every, repeats=repeats, order="alternating off/on, first pair dropped",
                  runs_off=off, runs_on=on)
    write_result("tensorboard_overhead", [
        result("tensorboard_overhead", "train_seconds_with_tensorboard", False, statistics.median(on),
               "jsonl_only", statistics.median(off), goal=0.95, **config),
        result("tensorboard_overhead", "log_call_seconds_with_tensorboard", False, call_on, "jsonl_only", call_off,
               machine="2 cores, shared", scalars_per_call=12, calls=300, repeats=3),
    ])


if __name__ == "__main__":
    main()
