"""Writers for an Explanation (safety/explain.py): PNG heatmaps, JSON, safetensors and one HTML page.

Into a directory, every file written atomically (temporary file + rename):
- attention_heads.png        a heatmap per layer (rows) and head (columns), query rows × key columns; a model
                             with more than 64 heads in all gets one attention_layerNN.png per layer instead;
- attention_mean.png         the head-averaged map of each layer, and the average over layers;
- rollout.png                attention rollout (T×T);
- attributions.png           gradient×input and integrated gradients per prompt token, with rollout's and
                             the last layer's attention from the last position for comparison;
- attributions.json          the per-token numbers, target, logits, completeness gap, timings;
- rollout.json               the full rollout matrix;
- attention.safetensors      the (L, H, T, T) probabilities;
- index.html                 one self-contained page: the prompt's tokens coloured by each attribution and
                             every image embedded (base64), so the page can be mailed or opened offline.

Usage:
    from lmstack.safety.explain_report import write_report
    paths = write_report(explanation, tokens, "runs/explain", target_text="x")
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors.torch import save_file

from lmstack.config import atomic_save_figure, atomic_write_text
from lmstack.safety.explain import Explanation

MAX_TICKS = 40  # longer prompts get unlabelled axes: 40 labels already overlap at this figure size
MAX_PANELS = 64  # heads in one attention_heads.png; past this, one picture per layer keeps each one legible


def _label(ax, tokens: list[str], rows: bool = True, x: bool = True, y: bool = True) -> None:
    """Token names on the x axis (and the y axis of a heatmap; a bar chart keeps its value ticks). In a grid
    only the outer panels are labelled (x, y): the labels are most of the drawing time."""
    few = len(tokens) <= MAX_TICKS
    if few and x:
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    if not rows:
        return
    if few and y:
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    else:
        ax.set_yticks([])


def _grid(maps: list[torch.Tensor], titles: list[str], tokens: list[str], suptitle: str, cols: int = 4) -> Figure:
    n = len(maps)
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    panel = 3.2 if cols <= 4 else 2.2
    fig = Figure(figsize=(panel * cols, panel * rows + 0.4), layout="constrained")
    fig.suptitle(suptitle)
    for i, (m, title) in enumerate(zip(maps, titles)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        _label(ax, tokens, x=i >= n - cols, y=i % cols == 0)
    return fig


def _attribution_figure(ex: Explanation, tokens: list[str], target_text: str) -> Figure:
    series = [("gradient×input", ex.grad_x_input), ("integrated gradients", ex.integrated_gradients),
              ("rollout (last position)", ex.rollout[-1]), ("last-layer attention (last position)",
                                                            ex.attention[-1].mean(0)[-1])]
    fig = Figure(figsize=(max(6.0, 0.35 * len(tokens) + 2), 8), layout="constrained")
    fig.suptitle(f"what the next token {target_text!r} draws on")
    for i, (name, values) in enumerate(series):
        ax = fig.add_subplot(len(series), 1, i + 1)
        v = values.numpy()
        ax.bar(range(len(v)), v, color=["tab:red" if x >= 0 else "tab:blue" for x in v])
        ax.set_title(name, fontsize=9)
        ax.axhline(0.0, color="black", linewidth=0.5)
        _label(ax, tokens, rows=False)
    return fig


def _atomic_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _colour(value: float, scale: float) -> str:
    """Red for positive, blue for negative, opacity by |value| / scale."""
    a = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    rgb = "214,39,40" if value >= 0 else "31,119,180"
    return f"rgba({rgb},{a:.3f})"


def _token_row(name: str, tokens: list[str], values: torch.Tensor) -> str:
    scale = float(values.abs().max()) if len(values) else 0.0
    spans = "".join(
        f'<span class="tok" style="background:{_colour(float(v), scale)}" title="{html.escape(t)}: {float(v):.4g}">'
        f"{html.escape(t) or '&nbsp;'}</span>" for t, v in zip(tokens, values))
    return f"<tr><th>{html.escape(name)}</th><td>{spans}</td></tr>"


def _page(ex: Explanation, tokens: list[str], target_text: str, images: dict[str, Path]) -> str:
    rows = "".join([
        _token_row("gradient×input", tokens, ex.grad_x_input),
        _token_row("integrated gradients", tokens, ex.integrated_gradients),
        _token_row("attention rollout", tokens, ex.rollout[-1]),
        _token_row("last-layer attention", tokens, ex.attention[-1].mean(0)[-1]),
    ])
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, path in images.items())
    facts = (f"target {html.escape(repr(target_text))} (id {ex.target_id}); logit {ex.target_logit:.4g}, at the "
             f"{html.escape(ex.baseline)} baseline {ex.baseline_logit:.4g} ({len(ex.kept)} special tokens held fixed); integrated gradients with {ex.steps} "
             f"steps miss completeness by {ex.ig_gap:.3g} ({100 * ex.ig_relative_gap:.2f}% of the logit change); "
             f"recorded attention reproduces the layers to {ex.reproduction_error:.2g}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmstack explain</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th {{ text-align: right; padding-right: 1em; font-weight: 500; }}
td {{ padding: 0.3em 0; }} .tok {{ font-family: monospace; white-space: pre; padding: 0.1em 0.15em; margin: 0 1px;
  border-radius: 3px; }}
figure {{ display: inline-block; margin: 1em; vertical-align: top; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>Why this next token?</h1>
<p>{facts}.</p>
<p>Red pushes the target's logit up, blue pushes it down; the stronger the colour, the larger the share.</p>
<table>{rows}</table>
{figures}
</body></html>
"""


def write_report(ex: Explanation, tokens: list[str], out: str | os.PathLike, target_text: str = "") -> dict[str, Path]:
    """Write the explanation's files into `out` (see the module docstring); returns name -> path."""
    if len(tokens) != len(ex.ids):
        raise ValueError(f"{len(tokens)} token strings for {len(ex.ids)} token ids")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_layers, n_heads = ex.attention.shape[:2]
    images: dict[str, Path] = {}
    images["attributions"] = atomic_save_figure(_attribution_figure(ex, tokens, target_text), out / "attributions.png")
    means = [ex.attention[layer].mean(0) for layer in range(n_layers)] + [ex.attention.mean((0, 1))]
    images["attention, head-averaged"] = atomic_save_figure(
        _grid(means, [f"layer {i}" for i in range(n_layers)] + ["all layers"], tokens, "attention, heads averaged"),
        out / "attention_mean.png")
    rollout_fig = _grid([ex.rollout], ["rollout"], tokens, "attention rollout")
    images["attention rollout"] = atomic_save_figure(rollout_fig, out / "rollout.png")
    if n_layers * n_heads <= MAX_PANELS:  # one picture of every head: layers down, heads across
        maps = [ex.attention[layer, head] for layer in range(n_layers) for head in range(n_heads)]
        titles = [f"layer {layer} head {head}" for layer in range(n_layers) for head in range(n_heads)]
        fig = _grid(maps, titles, tokens, "attention per layer and head", cols=n_heads)
        images["attention per layer and head"] = atomic_save_figure(fig, out / "attention_heads.png")
    else:
        for layer in range(n_layers):
            fig = _grid(list(ex.attention[layer]), [f"head {h}" for h in range(n_heads)], tokens, f"layer {layer}",
                        cols=8)
            images[f"layer {layer}"] = atomic_save_figure(fig, out / f"attention_layer{layer:02d}.png")
    paths = {name.replace(" ", "_"): p for name, p in images.items()}

    summary = {
        "tokens": tokens, "ids": ex.ids, "target": target_text, "target_id": ex.target_id,
        "target_logit": ex.target_logit, "baseline": ex.baseline, "baseline_logit": ex.baseline_logit,
        "steps": ex.steps, "ig_gap": ex.ig_gap, "ig_relative_gap": ex.ig_relative_gap,
        "reproduction_error": ex.reproduction_error, "kept_positions": ex.kept,
        "grad_x_input": ex.grad_x_input.tolist(), "integrated_gradients": ex.integrated_gradients.tolist(),
        "rollout_last": ex.rollout[-1].tolist(), "last_layer_attention_last": ex.attention[-1].mean(0)[-1].tolist(),
        "seconds": ex.seconds,
    }
    paths["attributions_json"] = out / "attributions.json"
    atomic_write_text(paths["attributions_json"], json.dumps(summary, indent=2) + "\n")
    paths["rollout_json"] = out / "rollout.json"
    atomic_write_text(paths["rollout_json"], json.dumps({"tokens": tokens, "rollout": ex.rollout.tolist()}) + "\n")
    paths["attention"] = out / "attention.safetensors"
    _atomic_bytes(paths["attention"], lambda tmp: save_file({"attention": ex.attention.contiguous()}, str(tmp)))
    paths["html"] = out / "index.html"
    atomic_write_text(paths["html"], _page(ex, tokens, target_text, images))
    return paths
