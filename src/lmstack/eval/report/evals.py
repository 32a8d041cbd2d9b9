"""The report's evaluation sections: evaluate()'s results from eval_<stage>.json, as one table with a column
per stage ("± stderr", a chance column beside every multiple-choice score) and a bar plot of the [0, 1]
scores, and per-task speed (tokens/s, TTFT, memory, FLOPs, energy) from the last stage.

Usage:
    from lmstack.eval.report.evals import eval_table, load_evals
    evals = load_evals(Path("runs/x"))       # {"base": {...results...}, "sft": {...}}, in the order they ran
    lines, scores, chance = eval_table(evals)
"""
from __future__ import annotations

from pathlib import Path

from lmstack.eval.plots import eval_plot
from lmstack.eval.report.common import fmt_num, fmt_score, read_json, rel_path

NO_CHANCE = ("ece",)
"""Metrics of a multiple-choice task that are not scores, so its chance level (1 / n_choices) is not shown."""
SPEED_KEYS = (("tokens_per_s", "tokens/s", "{:.0f}"), ("ttft_s", "TTFT s", "{:.4f}"),
              ("peak_mem_mb", "peak MB", "{:.0f}"), ("flops_per_query", "FLOPs/query", "{:.3g}"),
              ("energy_j", "energy J (FLOPs)", "{:.3g}"), ("cpu_s", "CPU s", "{:.1f}"))


def load_evals(run: Path) -> dict[str, dict]:
    """stage -> evaluate() results, from eval_<stage>.json files, oldest first (the order stages ran)."""
    out = {}
    for path in sorted(run.glob("eval_*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            out[path.stem[len("eval_"):]] = data["results"]
    return out


def eval_table(evals: dict[str, dict]) -> tuple[list[str], dict, dict]:
    """Markdown rows (task x metric, a column per stage), plus the scores and chance levels for the plot."""
    stages = list(evals)
    scores: dict[str, dict[str, float]] = {}
    chance: dict[str, float | None] = {}
    cells: dict[str, dict[str, str]] = {}
    skipped: dict[str, str] = {}
    for stage, results in evals.items():
        for task, res in results.items():
            if not isinstance(res, dict):
                continue
            if res.get("skipped"):
                skipped.setdefault(task, str(res["skipped"]))
                continue
            for metric, value in (res.get("metrics") or {}).items():
                if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                row = f"{task} {metric}"
                scores.setdefault(row, {})[stage] = value
                err = res["metrics"].get(f"{metric}_stderr")
                cells.setdefault(row, {})[stage] = fmt_score(value) + (f" ± {fmt_score(err)}" if fmt_num(err) != "—" else "")
                c = res.get("chance")
                chance[row] = c if metric not in NO_CHANCE and isinstance(c, (int, float)) else chance.get(row)
                cells[row]["n"] = str(res.get("n", "—"))
    header = "| task / metric | n | " + " | ".join(stages) + " | chance |"
    lines = [header, "|---|---:|" + "---:|" * len(stages) + "---:|"]
    for row in cells:
        vals = " | ".join(cells[row].get(s, "—") for s in stages)
        lines.append(f"| {row} | {cells[row]['n']} | {vals} | {fmt_num(chance.get(row), '{:.3f}')} |")
    for task, why in skipped.items():
        if not any(r.startswith(task + " ") for r in cells):
            lines.append(f"| {task} | — | " + " | ".join("skipped" for _ in stages) + " | — |")
    notes = [f"- {task}: skipped — {why}" for task, why in skipped.items()]
    return lines + ([""] + notes if notes else []), scores, chance


def section_eval(run: Path, evals: dict[str, dict]) -> list[str]:
    if not evals:
        return ["_No evaluation results (eval_*.json)._", ""]
    lines, scores, chance = eval_table(evals)
    lines = ["Scores ± bootstrap standard error; a column per stage, in the order the stages ran. "
             "`chance` is the score of guessing uniformly among a multiple-choice item's answers.", ""] + lines
    # Only scores on a 0-1 scale share one plot; perplexities would flatten every bar.
    unit = {r: v for r, v in scores.items() if all(0.0 <= x <= 1.0 for x in v.values())}
    png = eval_plot(unit, chance, run / "plots" / "eval.png")
    if not png:
        return lines + [""]
    left = sorted(set(scores) - set(unit))
    return lines + ["", f"![eval scores]({rel_path(run, png)})", "",
                    "_Figure: evaluation scores that lie in [0, 1] (accuracies, exact match, ECE), one bar per stage "
                    "(eval_<stage>.json, in the order the stages ran), dashed tick = chance; unitless fractions."
                    + (f" Left out as they are on another scale (see the table): {', '.join(left)}." if left else "")
                    + "_", ""]


def section_speed(run: Path, evals: dict[str, dict]) -> list[str]:
    if not evals:
        return ["_No evaluation speed numbers (eval_*.json)._", ""]
    stage, results = list(evals.items())[-1]
    rows = [(t, r["perf"]) for t, r in results.items() if isinstance(r, dict) and isinstance(r.get("perf"), dict)]
    if not rows:
        return [f"_The {stage} evaluation recorded no performance numbers._", ""]
    lines = [f"Evaluation cost per task ({stage} stage; FLOPs are analytic forward FLOPs from the model config, "
             "energy = FLOPs x J/FLOP).", "",
             "| task | " + " | ".join(label for _, label, _ in SPEED_KEYS) + " |",
             "|---|" + "---:|" * len(SPEED_KEYS)]
    for task, perf in rows:
        lines.append(f"| {task} | " + " | ".join(fmt_num(perf.get(k), fmt) for k, _, fmt in SPEED_KEYS) + " |")
    return lines + [""]
