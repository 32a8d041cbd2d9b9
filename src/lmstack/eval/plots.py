"""PNG plots for the report card: loss curves from a metrics JSONL, and eval scores per stage.

matplotlib runs with the Agg backend (no display needed). Each function returns the written path, or None
when there is nothing to draw, so callers simply leave the picture out.

Usage:
    from lmstack.eval.plots import loss_plot, eval_plot
    loss_plot(read_metrics("runs/x/pretrain/metrics.jsonl"), "runs/x/plots/loss_pretrain.png", title="pretrain")
    eval_plot({"arc_easy acc": {"base": 0.31, "sft": 0.35}}, {"arc_easy acc": 0.25}, "runs/x/plots/eval.png")
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    # Atomic like every other write: render to a temp name, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key])]


def loss_plot(rows: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss", "val_loss"),
              title: str = "") -> Path | None:
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
    ax.set_ylabel("loss (nats/token)")
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
