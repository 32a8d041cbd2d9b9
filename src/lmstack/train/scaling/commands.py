"""`lmstack scaling`: train a grid of model sizes and token counts, fit Chinchilla's law and its frontier, and
(with --predict K) test the fit on one run at K x the largest budget.

A scaling file is a ScalingConfig YAML (lmstack.train.scaling.grid): a pretrain recipe, the sizes (model
overrides), FLOP budgets and/or token counts, and the prediction factor. Outputs in `out`: runs.jsonl (one row per
finished run; rerun the command to resume), runs/<name>/ (each pretrain run), report.json, loss_vs_flops.png,
isoflop.png, frontier.png.

Usage:
    lmstack scaling --config recipes/scaling.yaml
    lmstack scaling --config recipes/scaling.yaml --predict 4 --out runs/scaling
    # scaling.yaml
    recipe: recipes/shakespeare_char.yaml
    data: world
    sizes: [{d_model: 48, n_layers: 2, n_heads: 4}, {d_model: 64, n_layers: 2, n_heads: 4}, ...]
    budgets: [5.0e+11, 1.0e+12, 2.0e+12]
    predict: 4
"""
from __future__ import annotations

from typing import Any

from lmstack.config import ConfigCommand
from lmstack.train.scaling.grid import ScalingConfig
from lmstack.train.scaling.runner import run_scaling


def _run(cfg: ScalingConfig) -> dict[str, Any]:
    """Run a scaling-law grid over a pretrain recipe, fit L(N, D) and the compute-optimal frontier."""
    report = run_scaling(cfg)
    fit = report["fit"]
    law = fit["law"]
    print(f"scaling: {fit['n_runs']} runs; L(N, D) = {law['E']:.3f} + {law['A']:.4g}/N^{law['alpha']:.3f} + "
          f"{law['B']:.4g}/D^{law['beta']:.3f} (mean |error| {100 * fit['fit_rel_error']['mean_abs']:.2f}%)")
    ex = fit["exponents"]
    print("scaling: N_opt ~ C^a with a = " + ", ".join(
        f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in ex.items()))
    print(f"scaling: at C={fit['at_flops']:.3g}: N*={fit['optimal']['n_params']:,.0f}, "
          f"{fit['optimal']['tokens_per_param']:.1f} tokens per parameter")
    pred = report["prediction"]
    if pred:
        print(f"scaling: prediction at {pred['factor']:g}x ({pred['flops']:.3g} FLOPs), N={pred['n_used']:,} "
              f"D={pred['tokens_used']:,}: predicted {pred['predicted_loss']:.4f}, measured "
              f"{pred['measured_loss']:.4f} ({100 * pred['rel_error']:+.2f}%)")
    print(f"report: {cfg.out}/report.json")
    return report


COMMANDS = ConfigCommand(ScalingConfig, _run)
