"""Character-level Tiny Shakespeare under an equal wall-clock budget: nanoGPT's recipe vs ours.

Both runs get the same 120 s of training on this machine, one after the other in this process:
- baseline: GPT-2 style as nanoGPT's CPU recipe sets it up (recipes/shakespeare_char.yaml: learned
  positions, LayerNorm, GELU, AdamW + warmup/cosine, 4 layers x 128, block 64, batch 12, lr 1e-3);
- ours: the modern recipe below (RoPE, RMSNorm, SwiGLU, QK-norm, Muon, WSD, 4x longer context).
Validation loss is measured on the whole held-out 10% (the same split as nanoGPT).
Goal: ours reaches val loss <= 1.70 in the budget. Also reported: the baseline's tokens/s against
nanoGPT's ~50 ms per 12x64-token iteration on this machine (15.4k tokens/s), so loop overhead shows.

Usage:
    python benchmarks/train_shakespeare.py [--seconds 120]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from _common import result, write_result

from lmstack.config import load_config
from lmstack.train.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT_TOKENS_PER_S = 12 * 64 / 0.050


def modern(cfg: PretrainConfig) -> PretrainConfig:
    """Our recipe: same data, same budget, modern architecture and optimizer."""
    cfg.model = cfg.model.replace(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, norm="rmsnorm", position="rope",
        mlp="swiglu", d_ff=384, qk_norm=True, tie_embeddings=False, hf_model_type="", name="shakespeare-char-modern")
    cfg.optim = cfg.optim.__class__(name="muon", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, muon_lr=0.02)
    cfg.schedule = cfg.schedule.__class__(name="wsd", warmup_steps=30, decay_fraction=0.4, min_lr_ratio=0.0)
    # Small batches of long rows: the 120 s budget is token-limited, so more, cheaper steps win (tuned on
    # 60 s runs: d_model 256/192/128/96, batch 8/16/32, seq 128/256, Muon LR 0.01/0.02/0.04).
    cfg.data.batch_size, cfg.data.seq_len = 8, 256
    return cfg


def run(cfg: PretrainConfig, seconds: float, out: Path) -> dict:
    cfg.out = str(out)
    cfg.data.text = str(DATA)
    cfg.train.max_seconds = seconds
    if cfg.model.name.endswith(("modern", "full-budget")):
        cfg.train.steps = 100_000  # stop on the clock; the LR schedule then follows elapsed time
    cfg.train.eval_every, cfg.train.eval_batches, cfg.train.progress = 0, 10_000, False
    cfg.train.resume = False
    return pretrain(cfg, log=lambda m: None)


def main(seconds: float = 120.0) -> None:
    if not DATA.exists():
        print(f"skipping: {DATA} not found")
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = run(load_config(PretrainConfig, ROOT / "recipes" / "shakespeare_char.yaml"), seconds, Path(tmp) / "base")
        # nanoGPT's recipe stops at 2000 iterations, before the budget runs out here; this variant keeps
        # its architecture and optimizer but stretches the schedule over the whole budget.
        full = load_config(PretrainConfig, ROOT / "recipes" / "shakespeare_char.yaml")
        full.model = full.model.replace(name="shakespeare-char-gpt2-full-budget")
        base_full = run(full, seconds, Path(tmp) / "base_full")
        ours = run(modern(load_config(PretrainConfig, ROOT / "recipes" / "shakespeare_char.yaml")), seconds,
                   Path(tmp) / "ours")
    for name, s in (("baseline (nanoGPT recipe, 2000 iterations)", base),
                    ("baseline stretched to the whole budget", base_full), ("ours (modern recipe)", ours)):
        print(f"{name}: val loss {s['val_loss']:.4f} after {s['steps']} steps, {s['tokens_seen']:,} tokens in "
              f"{s['train_seconds']:.0f}s ({s['tokens_seen'] / s['train_seconds']:.0f} tok/s), {s['parameters']:,} params")
    cfg = dict(seconds=seconds, data="tinyshakespeare char, 90/10 split")
    results = [
        result("train_shakespeare", "val_loss", False, ours["val_loss"], "nanoGPT-style baseline, same budget",
               base["val_loss"], goal=None, target_val_loss=1.70, ours_steps=ours["steps"], base_steps=base["steps"], **cfg),
        result("train_shakespeare", "val_loss_vs_stretched_baseline", False, ours["val_loss"],
               "GPT-2 baseline trained for the whole budget", base_full["val_loss"], base_full_steps=base_full["steps"],
               **cfg),
        result("train_shakespeare", "baseline_tokens_per_s_vs_nanogpt", True, base["tokens_seen"] / base["train_seconds"],
               "nanoGPT (~50 ms per 12x64 iteration here)", NANOGPT_TOKENS_PER_S, **cfg),
        result("train_shakespeare", "val_loss_vs_target", False, ours["val_loss"], "the issue's target val loss", 1.70,
               goal=1.0, **cfg),
    ]
    write_result("train_shakespeare", results)


if __name__ == "__main__":
    secs = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 120.0
    main(secs)
