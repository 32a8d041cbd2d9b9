"""Plots of a finished sweep, as PNG files beside its trials table: the optimisation history (each trial's value
and the best so far), the objective against each searched key, and the keys' importance (Optuna's
default importance evaluator; drawn when run_sweep could compute it: two keys or more, enough complete trials).

Usage:
    from lmstack.train.sweep.plots import plot_sweep
    paths = plot_sweep(result.trials, params, "runs/sweep", direction="minimize")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.config import atomic_save_figure
from lmstack.train.sweep.space import Param


def _figure(n_axes: int = 1, width: float = 5.0):
    # lazy: heavy (matplotlib), imported only when a sweep draws its plots
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), as above
    import matplotlib.pyplot as plt

    return plt.subplots(1, n_axes, figsize=(width * n_axes, 3.6), squeeze=False)


def plot_history(trials: list[dict[str, Any]], path: Path, direction: str = "minimize") -> Path:
    """Each complete trial's value by trial number, and the running best, in one PNG."""
    done = [t for t in trials if t["state"] == "COMPLETE"]
    fig, axes = _figure()
    ax = axes[0][0]
    xs, ys = [t["number"] for t in done], [t["value"] for t in done]
    ax.scatter(xs, ys, s=14, label="trial")
    best, running = [], None
    for y in ys:
        running = y if running is None else (min(running, y) if direction == "minimize" else max(running, y))
        best.append(running)
    ax.step(xs, best, where="post", color="C3", label="best so far")
    pruned = [t["number"] for t in trials if t["state"] == "PRUNED"]
    ax.set(xlabel="trial", ylabel="objective", title=f"{len(done)} complete, {len(pruned)} pruned, "
           f"{sum(t['state'] == 'FAIL' for t in trials)} failed")
    ax.legend()
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_params(trials: list[dict[str, Any]], params: list[Param], path: Path) -> Path:
    """The objective against each searched key (log x for loguniform), one panel per key."""
    done = [t for t in trials if t["state"] == "COMPLETE"]
    fig, axes = _figure(len(params), width=4.0)
    for ax, p in zip(axes[0], params):
        xs = [t["params"][p.key] for t in done]
        if p.kind == "choice":  # categories on an even axis, in the order the space lists them
            index = {repr(c): i for i, c in enumerate(p.choices)}
            ax.set_xticks(range(len(p.choices)), [str(c) for c in p.choices])
            xs = [index[repr(x)] for x in xs]
        ax.scatter(xs, [t["value"] for t in done], s=14)
        if p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=p.key, ylabel="objective")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_importance(importances: dict[str, float], path: Path) -> Path:
    """A horizontal bar per key: its share of the objective's variance."""
    fig, axes = _figure()
    ax = axes[0][0]
    keys = list(importances)[::-1]
    ax.barh(keys, [importances[k] for k in keys])
    ax.set(xlabel="importance (Optuna evaluator)", title="parameter importance")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_sweep(trials: list[dict[str, Any]], params: list[Param], out: str | Path, direction: str = "minimize",
               importances: dict[str, float] | None = None) -> list[Path]:
    """history.png, params.png and (when given importances) importance.png in `out`; [] without a complete trial."""
    out = Path(out)
    if not any(t["state"] == "COMPLETE" for t in trials):
        return []
    paths = [plot_history(trials, out / "history.png", direction), plot_params(trials, params, out / "params.png")]
    if importances:
        paths.append(plot_importance(importances, out / "importance.png"))
    return paths
