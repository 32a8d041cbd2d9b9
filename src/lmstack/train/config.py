"""TrainConfig: the knobs of the training loop itself (the model, optimizer, schedule, objective, data
and distributed settings have their own configs, nested in the run config of pretrain.py).

Usage:
    cfg = TrainConfig(steps=2000, grad_accum=2, clip_grad_norm=1.0, ema_decay=0.999)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to run."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size * grad_accum * world_size)."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    grad_noise_eta: float = 0.0
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015): variance eta / (1 + step)^gamma. 0 = off."""
    grad_noise_gamma: float = 0.55
    """Decay exponent of the gradient-noise variance."""
    spike_guard: bool = True
    """Skip (and count) steps whose loss or gradient norm is not finite."""
    spike_factor: float = 0.0
    """Also skip steps whose loss exceeds this multiple of the running mean loss (0 = off)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler."""
    compile: bool = False
    """torch.compile the model."""
    eval_every: int = 100
    """Validate every N steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    log_every: int = 10
    """Write a metrics row every N steps."""
    save_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints that verify kept on disk (older ones are deleted; corrupt ones are moved into
    checkpoints/corrupt/ and do not count)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0 = off)."""
    swa_start: float = 0.0
    """Start stochastic weight averaging at this fraction of training (0 = off)."""
    swa_every: int = 10
    """Steps between SWA snapshots."""
    average_last: int = 0
    """At the end, evaluate the average of the last K saved checkpoints (0 = off)."""
    adaptive_batch: bool = False
    """Estimate the gradient noise scale and double grad_accum when it outgrows the batch."""
    gns_every: int = 10
    """Steps between gradient-noise-scale updates (needs grad_accum >= 2 to measure)."""
    max_grad_accum: int = 16
    """Upper bound for the adaptive batch size."""
    seed: int = 0
    """Seed of model init, data order and every random choice the objective makes."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """torch CPU threads: 0 = auto (the cores this process may use, minus those other processes keep busy right
    now; at least 1), N = exactly N. See lmstack.threads."""
    max_seconds: float = 0.0
    """Wall-clock budget: stop when it is spent; the LR schedule then follows elapsed time (0 = off)."""
    resume: bool = True
    """Resume from the newest checkpoint in the output directory that verifies, if any. Checkpoints that fail
    verification are moved into checkpoints/corrupt/; when the directory holds checkpoints but none verifies,
    training refuses to start over unless `restart` is set."""
    restart: bool = False
    """Start from step 0 even though the output directory holds checkpoints (good or corrupt): the earlier run's
    checkpoints/, metrics.jsonl, loss.png and tensorboard/ are first moved (renamed, never deleted) into
    replaced/<UTC time>/. Without it, training over existing checkpoints either resumes or refuses."""
    progress: bool = True
    """Show a progress bar."""
