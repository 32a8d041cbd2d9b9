"""PNG plots for the report card: loss curves and every other logged metric from a metrics JSONL, and eval
scores per stage.

matplotlib runs with the Agg backend (no display needed); every figure is written atomically
(lmstack.config.atomic_save_figure). Each function returns the written path, or None when there is nothing to
draw, so callers simply leave the picture out.

Usage:
    from lmstack.eval.plots import loss_plot, eval_plot, metric_panels, curves_plot
    loss_plot(read_metrics("runs/x/pretrain/metrics.jsonl"), "runs/x/plots/loss_pretrain.png", title="pretrain")
    curves_plot(rows, metric_panels(rows), "runs/x/plots/curves_pretrain.png")   # lr, grad norm, tokens/s, ...
    eval_plot({"arc_easy acc": {"base": 0.31, "sft": 0.35}}, {"arc_easy acc": 0.25}, "runs/x/plots/eval.png")
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lmstack.config import atomic_save_figure


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics JSONL; a torn last line (a run killed mid-write) is skipped, not fatal."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _plt():
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_figure(fig, path, dpi=110)


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key])]


NOT_CURVES = {"step", "time", "tokens", "tokens_seen", "skipped_total", "grad_accum", "n_pairs", "n", "loss",
              "val_loss"}
"""Row keys that are bookkeeping (counters, clocks) or already drawn by loss_plot, so metric_panels skips them."""
FIRST = ("reward_mean", "accuracy", "margin", "kl", "lr", "grad_norm", "tokens_per_s", "mfu")
"""Panels shown first, in this order (what a stage optimises, then how the optimizer runs); the rest follow
alphabetically."""


def metric_panels(rows: list[dict], max_panels: int = 12) -> tuple[list[list[str]], list[str]]:
    """Group a run's numeric keys into panels, one metric per panel with its own y-axis (so a learning rate
    of 1e-4 and a throughput of 1e4 never share an axis); a metric and its val_ twin share a panel, as they
    are on one scale. Returns (panels, left out for lack of room)."""
    keys = []
    for r in rows:
        for k, v in r.items():
            base = k[4:] if k.startswith("val_") else k
            if (base not in NOT_CURVES and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and not k.endswith(("_stderr", "_n"))):
                keys.append(k)
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k[4:] if k.startswith("val_") else k, []).append(k)
    order = [b for b in FIRST if b in groups] + sorted(b for b in groups if b not in FIRST)
    panels = [sorted(groups[b], key=lambda k: k.startswith("val_")) for b in order]
    panels = [p for p in panels if any(_points(rows, k) for k in p)]
    return panels[:max_panels], [k for p in panels[max_panels:] for k in p]


def curves_plot(rows: list[dict], panels: list[list[str]], path: str | Path, title: str = "") -> Path | None:
    """A grid of small plots against step: one panel per group of keys, each on its own y-axis."""
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 2.8 * n_rows), squeeze=False)
    for ax, keys in zip(axes.flat, panels):
        for key in keys:
            pts = _points(rows, key)
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("val_") or len(pts) < 3 else None,
                        markersize=3)
        ax.set_title(" / ".join(keys), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def loss_plot(rows: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss", "val_loss"),
              title: str = "", ylabel: str = "loss (nats/token)") -> Path | None:
    """Training (and validation) loss against step."""
    series = {k: _points(rows, k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, pts in series.items():
        ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("val") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def eval_plot(scores: dict[str, dict[str, float]], chance: dict[str, float | None], path: str | Path) -> Path | None:
    """Grouped bars: one group per score row (task metric), one bar per stage, a tick at chance level."""
    rows = [r for r, by_stage in scores.items() if any(isinstance(v, (int, float)) for v in by_stage.values())]
    if not rows:
        return None
    stages = list(dict.fromkeys(s for r in rows for s in scores[r]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) * max(1, len(stages)) + 2), 4))
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        xs = [j + i * width for j in range(len(rows))]
        ys = [scores[r].get(stage) if isinstance(scores[r].get(stage), (int, float)) else 0.0 for r in rows]
        ax.bar(xs, ys, width, label=stage)
    for j, r in enumerate(rows):
        if chance.get(r) is not None:
            ax.hlines(chance[r], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (dashed: chance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
