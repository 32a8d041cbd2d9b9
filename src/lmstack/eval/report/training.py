"""The report's training section: one row and two figures per training stage found in the run directory.

A stage is a folder with a metrics.jsonl: the run directory itself (a `lmstack pretrain`, `finetune` or
`align` run) or a stage folder up to two levels down (pretrain/, sft/run/, align/dpo/, align/grpo/ of a
speedrun), in the order they started. Its kind (pretraining, SFT, preference optimisation, online RL, reward
model) and the unit of its loss come from its config.yaml and the keys it logged. Each stage gets a loss curve
and a grid of every other metric it logged, one y-axis each, with a caption that says what is plotted.

Usage:
    from lmstack.eval.report.training import section_training, training_stages
    training_stages(Path("runs/x"))          # [("pretrain", Path("runs/x/pretrain/metrics.jsonl")), ...]
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.eval.plots import curves_plot, loss_plot, metric_panels, read_metrics
from lmstack.eval.report.common import fmt_num, rel_path


BPB_NOTE = ("`validation bits per byte` is the pretraining loop's own estimate: the mean next-token cross-entropy "
            "over the first `train.eval_batches` batches of `data.seq_len`-token windows of the validation data "
            "(packed rows, so early tokens of a window see little context), / ln 2, / bytes per token (for shards: "
            "measured on a 200-document sample of the validation shards; for `data.text`: the validation split's "
            "exact bytes / tokens). It is not the evaluation's `world_val_bpb bits_per_byte` "
            "computed twice: that one scores the first 20,000 characters of the same world validation text with "
            "evaluate()'s rolling log-likelihood (4,000-character documents, every token predicted with the "
            "longest context the model allows) and divides by those characters' exact UTF-8 bytes. Different text "
            "sample, context per token and byte count, so the two differ.")

SKIP_DIRS = {"checkpoints", "replaced", "model", "plots", "tensorboard", "wandb", "data"}
"""Folders that never hold a training stage's own metrics.jsonl (old runs moved aside, saved models, ...)."""


def _first_time(path: Path) -> float:
    """When a stage started: its first row's time (MetricsLogger writes one), else the file's mtime."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            t = json.loads(f.readline() or "{}").get("time")
        return t if isinstance(t, (int, float)) else path.stat().st_mtime
    except (OSError, json.JSONDecodeError, AttributeError):
        return float("inf")


def training_stages(run: Path) -> list[tuple[str, Path]]:
    """(stage name, metrics.jsonl) for the run directory itself and its stage folders up to two levels down
    (pretrain/, sft/run/, align/dpo/, ...), in the order they started; the run directory's own file is called
    after it."""
    found = []
    for depth in ("metrics.jsonl", "*/metrics.jsonl", "*/*/metrics.jsonl"):
        for path in sorted(run.glob(depth)):
            rel = path.parent.relative_to(run)
            if not SKIP_DIRS & set(rel.parts) and path.is_file():
                found.append((rel.as_posix() if rel.parts else run.resolve().name, path))
    order = {p: i for i, (_, p) in enumerate(found)}
    return sorted(found, key=lambda sp: (_first_time(sp[1]), order[sp[1]]))


def stage_kind(stage_dir: Path, rows: list[dict]) -> tuple[str, str]:
    """(what kind of training this was, the unit of its `loss`), from its config.yaml and the keys it logged."""
    cfg = {}
    try:
        # lazy: guarded: any failure here, the import included, only costs the label
        from lmstack.config import read_mapping

        cfg = read_mapping(stage_dir / "config.yaml") if (stage_dir / "config.yaml").is_file() else {}
    except Exception:  # an unreadable config only costs the label
        cfg = {}
    keys = {k for r in rows for k in r}
    method = str(cfg.get("method") or stage_dir.name)
    if method == "rm":
        return ("reward model (Bradley-Terry)", "loss (nats per pair)")
    if "chosen_reward" in keys or "beta" in cfg and method in ("dpo", "cdpo", "ipo", "kto", "rm"):
        return (f"preference optimisation ({method})", "preference loss (nats per pair)")
    if "reward_mean" in keys or method in ("grpo", "ppo", "trpo", "rloo", "rft"):
        return (f"online RL ({method})", "policy surrogate loss (unitless)")
    if "adapter" in cfg or "val_token_acc" in keys or "val_exact" in keys:
        return (f"supervised fine-tuning ({cfg.get('method', 'sft')})", "loss (nats per assistant token)")
    return ("pretraining", "loss (nats/token)")


def section_training(run: Path, summary: dict | None) -> list[str]:
    stages = training_stages(run)
    if not stages:
        return ["_No training metrics (metrics.jsonl in the run directory or a stage folder)._", ""]
    lines: list[str] = []
    pre = (summary or {}).get("pretrain") or {}
    if pre:
        lines += ["| | |", "|---|---|", f"| parameters | {fmt_num(pre.get('parameters'), '{:,}')} |",
                  f"| tokens seen | {fmt_num(pre.get('tokens_seen'), '{:,}')} |",
                  f"| optimizer steps | {pre.get('steps', '—')}"
                  + (f" ({pre['skipped_steps']} skipped)" if pre.get("skipped_steps") else "") + " |",
                  f"| training time | {fmt_num(pre.get('train_seconds'), '{:.0f}')} s |",
                  f"| final validation loss | {fmt_num(pre.get('val_loss'))} nats/token |",
                  f"| validation perplexity | {fmt_num(pre.get('val_ppl'), '{:.2f}')} |",
                  f"| validation bits per byte | {fmt_num(pre.get('val_bpb'))} |", ""]
        if pre.get("val_bpb") is not None:
            lines += [BPB_NOTE, ""]
    lines += ["| stage | kind | steps | final loss | final validation loss | val bits/byte | mean tokens/s | mean MFU |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    pictures = []
    for stage, path in stages:
        rows = read_metrics(path)
        kind, loss_unit = stage_kind(path.parent, rows)

        def last(key: str):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            return vals[-1] if vals else None

        def mean(key: str):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
            return sum(vals) / len(vals) if vals else None

        lines.append(f"| {stage} | {kind} | {last('step') or '—'} | {fmt_num(last('loss'))} | {fmt_num(last('val_loss'))} | "
                     f"{fmt_num(last('val_bpb'))} | {fmt_num(mean('tokens_per_s'), '{:.0f}')} | "
                     f"{fmt_num(mean('mfu'), '{:.1%}')} |")
        slug = stage.replace("/", "_")
        src = rel_path(run, path) if path.parent != run else "metrics.jsonl"
        png = loss_plot(rows, run / "plots" / f"loss_{slug}.png", title=f"{stage}: {kind}", ylabel=loss_unit)
        if png:
            pictures += [f"![loss curve: {stage}]({rel_path(run, png)})", "",
                         f"_Figure: {stage} ({kind}): training `loss` (line, logged every log_every steps)"
                         + (" and `val_loss` on held-out data (dots)" if last("val_loss") is not None else "")
                         + f" against step, from {src}; y: {loss_unit}._",
                         ""]
        panels, left_out = metric_panels(rows)
        png = curves_plot(rows, panels, run / "plots" / f"curves_{slug}.png", title=f"{stage}: {kind}")
        if png:
            extra = f" Not drawn (no room): {', '.join(left_out)}." if left_out else ""
            pictures += [f"![metrics: {stage}]({rel_path(run, png)})", "",
                         f"_Figure: every other metric {stage} logged, against step, from {src}: one panel per "
                         f"metric, each on its own y-axis (a `val_` twin shares its panel); units as logged: "
                         f"lr absolute, grad_norm L2 before clipping, tokens_per_s tokens/second, mfu a fraction "
                         f"of the measured matmul peak, rates and accuracies fractions.{extra}_", ""]
    return lines + [""] + pictures
