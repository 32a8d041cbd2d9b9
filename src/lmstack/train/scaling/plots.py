"""Plots of a scaling report (runner.py's report.json), as PNG files beside it:
- loss_vs_flops.png: each run's val loss against its FLOPs (6 N D), one line per model size, with the fitted
  law's curve for each size dashed over the same FLOP range (and the prediction run, if any, as a star);
- isoflop.png: val loss against N for each FLOP budget, with the parabola in log N fitted to it (approach 2)
  and its vertex;
- frontier.png: compute-optimal N against C: approach 1's minima, approach 2's vertices, their power laws and
  the law's N*(C) (approach 3), with the size the prediction run used.

Usage:
    from lmstack.train.scaling.plots import plot_scaling
    paths = plot_scaling(json.loads(Path("runs/scaling/report.json").read_text()), "runs/scaling")
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.config import atomic_save_figure
from lmstack.train.scaling.fit import ChinchillaLaw


def _figure():
    # lazy: heavy (matplotlib), imported only when a scaling run draws its plots
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), as above
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.6, 4.0))


def plot_loss_vs_flops(report: dict[str, Any], path: Path) -> Path:
    law = ChinchillaLaw(**report["fit"]["law"])
    by_size: dict[int, list[dict]] = defaultdict(list)
    for row in report["grid"]:
        by_size[row["n_params"]].append(row)
    fig, ax = _figure()
    flops = [r["flops_6nd"] for r in report["grid"]]
    span = np.geomspace(min(flops) / 1.5, max(flops) * 1.5 * (report["config"].get("predict") or 1.0), 60)
    for i, (n, rows) in enumerate(sorted(by_size.items())):
        rows = sorted(rows, key=lambda r: r["flops_6nd"])
        color = f"C{i % 10}"
        ax.plot([r["flops_6nd"] for r in rows], [r["val_loss"] for r in rows], "o-", color=color, ms=4,
                label=f"N={n:,}")
        ax.plot(span, law.loss(n, span / (6.0 * n)), "--", color=color, lw=0.8)
    pred = report.get("prediction")
    if pred:
        ax.plot([pred["flops"]], [pred["measured_loss"]], "k*", ms=10, label="prediction run (measured)")
        ax.plot([pred["flops"]], [pred["predicted_loss"]], "kx", ms=8, label="law's prediction")
    seen = [r["val_loss"] for r in report["grid"]] + ([pred["measured_loss"], pred["predicted_loss"]] if pred else [])
    # the law's curves shoot up left of the grid for the largest sizes: keep the axis on the measured losses
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (6 N D)", ylabel="val loss",
           ylim=(0.9 * min(seen), 1.2 * max(seen)), title="loss vs compute by size (dashed: fitted law)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_isoflop(report: dict[str, Any], path: Path) -> Path:
    by_budget: dict[float, list[dict]] = defaultdict(list)
    for row in report["grid"]:
        if row.get("budget"):
            by_budget[row["budget"]].append(row)
    fig, ax = _figure()
    for i, (budget, rows) in enumerate(sorted(by_budget.items())):
        rows = sorted(rows, key=lambda r: r["n_params"])
        x, y = np.log([r["n_params"] for r in rows]), [r["val_loss"] for r in rows]
        color = f"C{i % 10}"
        ax.plot(np.exp(x), y, "o", color=color, label=f"C={budget:.2g}")
        if len(rows) >= 3:
            c2, c1, c0 = np.polyfit(x, y, 2)
            grid = np.linspace(x.min(), x.max(), 50)
            ax.plot(np.exp(grid), c2 * grid ** 2 + c1 * grid + c0, "-", color=color, lw=1)
            if c2 > 0:
                v = -c1 / (2 * c2)
                ax.plot([np.exp(v)], [c2 * v * v + c1 * v + c0], "v", color=color, ms=8)
    ax.set(xscale="log", xlabel=f"N ({report['params'].replace('_', '-')} parameters)", ylabel="val loss",
           title="IsoFLOP curves and parabolas in log N (v: vertex)")
    if by_budget:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    fit = report["fit"]
    law = ChinchillaLaw(**fit["law"])
    flops = [r["flops_6nd"] for r in report["grid"]]
    span = np.geomspace(min(flops), max(max(flops), fit["at_flops"]) * 1.5, 50)
    fig, ax = _figure()
    ax.plot(span, [law.optimal(c)[0] for c in span], "k-", label=f"approach 3 (law): a={law.exponent:.2f}")
    for i, (key, marker) in enumerate((("approach1", "s"), ("approach2", "^"))):
        front = fit[key]
        if "points" not in front:
            continue
        pts = np.array(front["points"])
        ax.plot(pts[:, 0], pts[:, 1], marker, color=f"C{i}", label=f"{key}: a={front['a']:.2f}")
        ax.plot(span, front["k"] * span ** front["a"], "--", color=f"C{i}", lw=0.8)
    pred = report.get("prediction")
    if pred:
        ax.plot([pred["flops"]], [pred["n_used"]], "r*", ms=11, label=f"prediction run N={pred['n_used']:,}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (6 N D)", ylabel="compute-optimal N",
           title="compute-optimal frontier")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_scaling(report: dict[str, Any], out: str | Path) -> list[Path]:
    """Write the three PNGs into `out`; return their paths."""
    out = Path(out)
    return [plot_loss_vs_flops(report, out / "loss_vs_flops.png"), plot_isoflop(report, out / "isoflop.png"),
            plot_frontier(report, out / "frontier.png")]
