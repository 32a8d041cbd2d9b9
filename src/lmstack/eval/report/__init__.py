"""The report card: `lmstack report RUN_DIR` gathers every stage a run produced into RUN_DIR/report.md.

It reads whatever is there and leaves out (with a one-line note) whatever is not, so it works on a run
that stopped half way and on runs with stages added later (SFT, alignment):
  - summary.json            the run's own summary (stage timings, parameters, samples), e.g. the speedrun's
  - data/report.json        the data pipeline's funnel (seen/kept/dropped per step), data/funnel.png
  - tokenizer/              tokenizer.json + tokenizer_config.json (type, vocabulary, training corpus);
                            bytes per token is measured on a sample of data/clean.jsonl
  - metrics.jsonl, */metrics.jsonl, */*/metrics.jsonl
                            one training stage per folder: the run directory itself (a `lmstack pretrain`,
                            `finetune` or `align` run), or pretrain/, sft/run/, align/dpo/, align/grpo/ of a
                            speedrun: final loss, validation loss, speed, a loss curve and a grid of every
                            other logged metric (lr, grad norm, tokens/s, rewards, KL...), one y-axis each
  - eval_*.json             evaluate()'s results, one file per stage (eval_base.json, eval_sft.json, ...):
                            one table with a column per stage, "± stderr", and a chance column next to
                            every multiple-choice score; per-task speed (tokens/s, TTFT, memory, FLOPs,
                            energy) from the last stage
  - eval_*/samples_*.jsonl  a few per-item logs
  - *.md fragments named in summary.json's "sections" (e.g. a passkey table) are appended.
  - regressions: every metric with a stderr, from each stage to the next that measured it (eval_*.json in
    order, then align/scores.json's SFT -> aligned), flagged when it got worse by more than the stderr of
    the difference, sqrt(se_before^2 + se_after^2).
Every figure has a one-line caption under it: what is plotted, from which file, in which units.

This module writes the markdown; the sections come from its siblings, one concept each: run_sections.py
(summary, data, tokenizer, samples, config), training.py (stages found and their curves), evals.py (the eval
table and speed), stage_regressions.py (the regressions table), common.py (JSON reading, cell formats).

Usage:
    lmstack report runs/20250101-120000
    from lmstack.eval.report import build_report; build_report("runs/x")   # -> Path of report.md
"""
from __future__ import annotations

from pathlib import Path

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.eval.report.common import read_json
from lmstack.eval.report.evals import load_evals, section_eval, section_speed
from lmstack.eval.report.run_sections import (section_config, section_data, section_samples, section_summary,
                                              section_tokenizer)
from lmstack.eval.report.stage_regressions import section_regressions
from lmstack.eval.report.training import section_training
from lmstack.multimodal.report import section_vlm


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (and RUN_DIR/plots/*.png) from what the run directory holds."""
    run = Path(run_dir)
    if not run.is_dir():
        raise LmstackError(f"run directory {run} does not exist")
    summary = read_json(run / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    evals = load_evals(run)
    lines = [f"# Report card — {run.resolve().name}", ""]
    lines += section_summary(run, summary)
    lines += ["## Data", ""] + section_data(run)
    lines += ["## Tokenizer", ""] + section_tokenizer(run)
    lines += ["## Training", ""] + section_training(run, summary)
    lines += ["## Evaluation", ""] + section_eval(run, evals)
    lines += ["## Regressions between stages", ""] + section_regressions(run, evals)
    lines += ["## Speed", ""] + section_speed(run, evals)
    note = f" ({summary['samples_note']})" if summary and summary.get("samples_note") else ""
    lines += [f"## Samples{note}", ""] + section_samples(run, summary)
    lines += section_vlm(run)  # [] unless the run holds a VLM: then its captions on sample pictures, as a PNG grid
    for extra in (summary or {}).get("sections") or []:
        path = run / str(extra)
        if path.is_file() and path.suffix == ".md":
            lines += [path.read_text(encoding="utf-8", errors="replace").rstrip(), ""]
    lines += ["## Run config", ""] + section_config(run)
    out = run / "report.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def report(run_dir: str) -> str:
    """Write RUN_DIR/report.md: data funnel, tokenizer, loss curves, eval table with chance, speed, samples.

    Args:
        run_dir: a run directory (e.g. one made by `lmstack speedrun`)."""
    path = build_report(run_dir)
    print(f"wrote {path}")
    return str(path)


COMMANDS = report
