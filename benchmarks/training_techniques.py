"""What the training-loop techniques buy, each against the plain loop on the same task and budget.

Task: next-token prediction on a random order-2-ish Markov chain (learnable structure, fixed seed),
a 2-layer model, 300 AdamW steps. Figures (ratio > 1 = the technique is ahead):
- EMA / SWA / checkpoint-averaged weights vs the raw final weights (val loss);
- gradient clipping at a too-high learning rate (val loss; without clipping the run degrades);
- annealed gradient-noise injection (val loss);
- adaptive batch size from the gradient noise scale (val loss at equal steps, and tokens used);
- activation checkpointing: peak memory of a training step vs without (and its time cost).

Usage:
    python benchmarks/training_techniques.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import result, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))
from _train_script import build  # noqa: E402  (the trainer tests' tiny run)

STEPS = 300


def fit(tmp: Path, name: str, lr: float = 3e-3, **kw) -> dict:
    trainer = build(tmp / name, steps=STEPS, save_every=kw.pop("save_every", 0), dropout=0.0, **kw)
    for g in trainer.optimizer.param_groups:
        g["lr"] = g["base_lr"] = lr
    return trainer.fit()


ACTIVATION_PROBE = """
import sys, time, torch
sys.path.insert(0, {bench!r})
from _common import peak_rss_mb, reset_peak_rss, rss_mb
from lmstack.model import ModelConfig, Transformer
torch.set_num_threads(2)
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, max_seq_len=1024))
model.checkpoint_blocks = {ckpt}
x = torch.randint(0, 512, (4, 1024))
reset_peak_rss()
base = rss_mb()
start = time.perf_counter()
model(x).logsumexp(-1).mean().backward()
print(peak_rss_mb() - base, time.perf_counter() - start)
"""


def activation_memory() -> tuple[float, float, float, float]:
    """Peak memory of one training step above the model's own, each setting in a fresh process.

    A fresh process per setting, because the allocator keeps freed pages: in one process the second
    run would fit inside the first one's high-water mark and measure nothing.
    """
    out = {}
    for ckpt in (False, True):
        code = ACTIVATION_PROBE.format(bench=str(Path(__file__).resolve().parent), ckpt=ckpt)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        mem, secs = map(float, proc.stdout.split())
        out[ckpt] = (mem, secs)
    return out[False][0], out[True][0], out[False][1], out[True][1]


def main() -> None:
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        avg = fit(tmp, "avg", ema_decay=0.98, swa_start=0.5, swa_every=5, average_last=3, save_every=50)
        for key, label in (("ema_val_loss", "EMA weights"), ("swa_val_loss", "SWA weights"),
                           ("ckpt_avg_val_loss", "average of last 3 checkpoints")):
            results.append(result("training_techniques", f"val_loss[{label}]", False, avg[key], "raw final weights",
                                  avg["val_loss"], steps=STEPS))
        hot = dict(lr=0.3)
        clipped = fit(tmp, "clip", clip_grad_norm=0.5, **hot)
        unclipped = fit(tmp, "noclip", clip_grad_norm=0.0, **hot)
        results.append(result("training_techniques", "val_loss[clipping at lr 0.3]", False, clipped["val_loss"],
                               "no clipping", unclipped["val_loss"], steps=STEPS, lr=0.3))
        plain = fit(tmp, "plain")
        noisy = fit(tmp, "noise", grad_noise_eta=0.01)
        results.append(result("training_techniques", "val_loss[gradient noise eta=0.01]", False, noisy["val_loss"],
                              "no noise", plain["val_loss"], steps=STEPS))
        adaptive = fit(tmp, "adaptive", grad_accum=2, adaptive_batch=True, gns_every=5, max_grad_accum=16, batch_size=2)
        small = fit(tmp, "small", grad_accum=2, batch_size=2)
        results.append(result("training_techniques", "val_loss[adaptive batch from noise scale]", False,
                              adaptive["val_loss"], "fixed batch of 4 rows", small["val_loss"], steps=STEPS,
                              tokens_adaptive=adaptive["tokens_seen"], tokens_fixed=small["tokens_seen"]))
    mem_off, mem_on, t_off, t_on = activation_memory()
    results.append(result("training_techniques", "peak_mb[activation checkpointing]", False, mem_on,
                          "no checkpointing", mem_off, d_model=256, n_layers=8, tokens=4096))
    results.append(result("training_techniques", "step_seconds[activation checkpointing]", False, t_on,
                          "no checkpointing", t_off, d_model=256, n_layers=8, tokens=4096))
    write_result("training_techniques", results)


if __name__ == "__main__":
    main()
