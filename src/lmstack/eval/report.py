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

Usage:
    lmstack report runs/20250101-120000
    from lmstack.eval.report import build_report; build_report("runs/x")   # -> Path of report.md
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.eval.plots import curves_plot, eval_plot, loss_plot, metric_panels, read_metrics

NO_CHANCE = ("ece",)
"""Metrics of a multiple-choice task that are not scores, so its chance level (1 / n_choices) is not shown."""
SPEED_KEYS = (("tokens_per_s", "tokens/s", "{:.0f}"), ("ttft_s", "TTFT s", "{:.4f}"),
              ("peak_mem_mb", "peak MB", "{:.0f}"), ("flops_per_query", "FLOPs/query", "{:.3g}"),
              ("energy_j", "energy J (FLOPs)", "{:.3g}"), ("cpu_s", "CPU s", "{:.1f}"))


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _num(x: Any, fmt: str = "{:.4f}") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return fmt.format(x)


def _score(x: Any) -> str:
    """A score: 4 decimals for the usual [0, 1]-ish metrics, 4 significant digits for big ones (perplexity)."""
    return _num(x, "{:.4f}" if isinstance(x, (int, float)) and abs(x) < 1000 else "{:.4g}")


def _rel(run: Path, path: Path) -> str:
    return path.relative_to(run).as_posix()


# ---- sections: each returns markdown lines, or a one-line note when its input is missing ----------------
def section_summary(run: Path, summary: dict | None) -> list[str]:
    if not summary:
        return ["_No summary.json in this run: stage timings and samples are not shown._", ""]
    lines = []
    if summary.get("model"):
        lines += [f"Model: {summary['model']}.", ""]
    world = summary.get("world")
    if isinstance(world, dict):
        size = f", {world['pretrain_bytes'] / 1e6:.1f} MB of pretraining text" if world.get("pretrain_bytes") else ""
        lines += [f"Synthetic world: size {world.get('size', '?')}, seed {world.get('seed', '?')}{size}.", ""]
    if summary.get("total_seconds") is not None:
        lines += [f"Total time: **{summary['total_seconds'] / 60:.1f} min** on this machine.", ""]
    timings = summary.get("timings") or {}
    if timings:
        lines += ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {_num(v, '{:.1f}')} |" for k, v in timings.items()]
        lines.append("")
    return lines


def section_data(run: Path) -> list[str]:
    report = _read_json(run / "data" / "report.json")
    if not isinstance(report, dict) or not report.get("steps"):
        return ["_No data pipeline report (data/report.json)._", ""]
    lines = ["| step | seen | kept | kept % | dropped (reason: count) | seconds |", "|---|---:|---:|---:|---|---:|"]
    for s in report["steps"]:
        seen, kept = s.get("seen", 0), s.get("kept", 0)
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted((s.get("dropped") or {}).items(), key=lambda kv: -kv[1]))
        pct = f"{100 * kept / seen:.1f}" if seen else "—"
        lines.append(f"| {s.get('name', '?')} | {seen:,} | {kept:,} | {pct} | {dropped or '—'} | "
                     f"{_num(s.get('seconds'), '{:.1f}')} |")
    shards = report.get("shards") or {}
    if shards.get("tokens"):
        lines += ["", f"Shards: {shards.get('docs', 0):,} documents, {shards['tokens']:,} tokens "
                      f"({shards.get('dtype', '?')}, {shards.get('shards', '?')} files)."]
    langs = report.get("languages") or {}
    if langs:
        top = sorted(langs.items(), key=lambda kv: -kv[1])[:5]
        lines += ["", "Languages: " + ", ".join(f"{k} {v:,}" for k, v in top) + "."]
    if (run / "data" / "funnel.png").is_file():
        lines += ["", "![data funnel](data/funnel.png)", "",
                  "_Figure: the data pipeline's funnel from data/report.json: documents seen and kept at each "
                  "step (counts of documents)._"]
    return lines + [""]


def _bytes_per_token(run: Path, tok_dir: Path, n_docs: int = 200) -> float | None:
    clean = run / "data" / "clean.jsonl"
    if not clean.is_file():
        return None
    try:
        from lmstack.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_dir)
        texts = []
        with open(clean, encoding="utf-8", errors="replace") as f:
            for line in f:
                if len(texts) >= n_docs:
                    break
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(tok.encode(t)) for t in texts)
        return n_bytes / n_tokens if n_tokens else None
    except Exception:  # a broken tokenizer must not sink the whole report; the row is just left out
        return None


def section_tokenizer(run: Path) -> list[str]:
    tok_dir = run / "tokenizer"
    cfg = _read_json(tok_dir / "tokenizer_config.json")
    tok_json = _read_json(tok_dir / "tokenizer.json")
    if not isinstance(cfg, dict) and not isinstance(tok_json, dict):
        return ["_No tokenizer in this run (tokenizer/)._", ""]
    meta = (cfg or {}).get("lmstack") or {}
    settings = meta.get("config") or {}
    training = meta.get("training") or {}
    vocab = ((tok_json or {}).get("model") or {}).get("vocab")
    added = (tok_json or {}).get("added_tokens") or []
    # Special tokens may or may not also sit in the model's vocab; the largest id is the honest size.
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)]
    rows = [("type", meta.get("type") or ((tok_json or {}).get("model") or {}).get("type")),
            ("vocabulary", f"{max(ids) + 1:,}" if ids else None),
            ("pre-tokenizer", settings.get("pretokenizer")),
            ("special tokens", len(added) or None),
            ("trained on", f"{training['texts']:,} texts, {training.get('chars', 0):,} characters"
             if training.get("texts") else None)]
    bpt = _bytes_per_token(run, tok_dir)
    if bpt:
        rows.append(("bytes per token (sample of the cleaned data)", f"{bpt:.2f}"))
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return lines + [""]


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
        lines += ["| | |", "|---|---|", f"| parameters | {_num(pre.get('parameters'), '{:,}')} |",
                  f"| tokens seen | {_num(pre.get('tokens_seen'), '{:,}')} |",
                  f"| optimizer steps | {pre.get('steps', '—')}"
                  + (f" ({pre['skipped_steps']} skipped)" if pre.get("skipped_steps") else "") + " |",
                  f"| training time | {_num(pre.get('train_seconds'), '{:.0f}')} s |",
                  f"| final validation loss | {_num(pre.get('val_loss'))} nats/token |",
                  f"| validation perplexity | {_num(pre.get('val_ppl'), '{:.2f}')} |",
                  f"| validation bits per byte | {_num(pre.get('val_bpb'))} |", ""]
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

        lines.append(f"| {stage} | {kind} | {last('step') or '—'} | {_num(last('loss'))} | {_num(last('val_loss'))} | "
                     f"{_num(last('val_bpb'))} | {_num(mean('tokens_per_s'), '{:.0f}')} | "
                     f"{_num(mean('mfu'), '{:.1%}')} |")
        slug = stage.replace("/", "_")
        src = _rel(run, path) if path.parent != run else "metrics.jsonl"
        png = loss_plot(rows, run / "plots" / f"loss_{slug}.png", title=f"{stage}: {kind}", ylabel=loss_unit)
        if png:
            pictures += [f"![loss curve: {stage}]({_rel(run, png)})", "",
                         f"_Figure: {stage} ({kind}): training `loss` (line, logged every log_every steps)"
                         + (" and `val_loss` on held-out data (dots)" if last("val_loss") is not None else "")
                         + f" against step, from {src}; y: {loss_unit}._",
                         ""]
        panels, left_out = metric_panels(rows)
        png = curves_plot(rows, panels, run / "plots" / f"curves_{slug}.png", title=f"{stage}: {kind}")
        if png:
            extra = f" Not drawn (no room): {', '.join(left_out)}." if left_out else ""
            pictures += [f"![metrics: {stage}]({_rel(run, png)})", "",
                         f"_Figure: every other metric {stage} logged, against step, from {src}: one panel per "
                         f"metric, each on its own y-axis (a `val_` twin shares its panel); units as logged: "
                         f"lr absolute, grad_norm L2 before clipping, tokens_per_s tokens/second, mfu a fraction "
                         f"of the measured matmul peak, rates and accuracies fractions.{extra}_", ""]
    return lines + [""] + pictures


def load_evals(run: Path) -> dict[str, dict]:
    """stage -> evaluate() results, from eval_<stage>.json files, oldest first (the order stages ran)."""
    out = {}
    for path in sorted(run.glob("eval_*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        data = _read_json(path)
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
                cells.setdefault(row, {})[stage] = _score(value) + (f" ± {_score(err)}" if _num(err) != "—" else "")
                c = res.get("chance")
                chance[row] = c if metric not in NO_CHANCE and isinstance(c, (int, float)) else chance.get(row)
                cells[row]["n"] = str(res.get("n", "—"))
    header = "| task / metric | n | " + " | ".join(stages) + " | chance |"
    lines = [header, "|---|---:|" + "---:|" * len(stages) + "---:|"]
    for row in cells:
        vals = " | ".join(cells[row].get(s, "—") for s in stages)
        lines.append(f"| {row} | {cells[row]['n']} | {vals} | {_num(chance.get(row), '{:.3f}')} |")
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
    return lines + ["", f"![eval scores]({_rel(run, png)})", "",
                    "_Figure: evaluation scores that lie in [0, 1] (accuracies, exact match, ECE), one bar per stage "
                    "(eval_<stage>.json, in the order the stages ran), dashed tick = chance; unitless fractions."
                    + (f" Left out as they are on another scale (see the table): {', '.join(left)}." if left else "")
                    + "_", ""]


LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "ece", "loss", "benign_refusal")
"""Name parts of metrics where a rise is the regression (used when a result does not say itself)."""


def _higher_is_better(metric: str, stated: dict | None = None) -> bool:
    if isinstance(stated, dict) and isinstance(stated.get(metric), bool):
        return stated[metric]
    return not any(part in metric for part in LOWER_IS_BETTER)


def stage_measurements(run: Path, evals: dict[str, dict]) -> list[tuple[str, dict[str, tuple[float, float, bool]]]]:
    """[(stage, {metric: (value, stderr, higher is better)})] in the order the stages ran: the eval_<stage>.json
    files, then align/scores.json's SFT and aligned columns. Only metrics that carry a stderr are kept."""
    out = []
    for stage, results in evals.items():
        got = {}
        for task, res in results.items():
            if not isinstance(res, dict) or res.get("skipped"):
                continue
            m = res.get("metrics") or {}
            for metric, value in m.items():
                err = m.get(f"{metric}_stderr")
                if metric.endswith("_stderr") or _num(value) == "—" or _num(err) == "—":
                    continue
                got[f"{task} {metric}"] = (float(value), float(err), _higher_is_better(metric, res.get("higher_is_better")))
        out.append((stage, got))
    scores = (_read_json(run / "align" / "scores.json") or {}).get("scores")
    if isinstance(scores, dict):
        for stage in ("sft", "aligned"):
            s = scores.get(stage) if isinstance(scores.get(stage), dict) else {}
            got = {f"{k} (align/scores.json)": (float(v), float(s[f"{k}_stderr"]), _higher_is_better(k))
                   for k, v in s.items() if not k.endswith("_stderr") and _num(v) != "—"
                   and _num(s.get(f"{k}_stderr")) != "—"}
            out.append((f"{stage} (align stage)", got))
    return out


def regressions(measured: list[tuple[str, dict]], z: float = 1.0) -> list[dict]:
    """For every metric, each pair of consecutive stages that measured it: the two values, their stderrs, and
    flagged = it got worse by more than z x sqrt(se_before^2 + se_after^2), the stderr of the difference."""
    rows, seen = [], {}
    for stage, metrics in measured:
        for metric, (value, err, higher) in metrics.items():
            if metric in seen:
                prev_stage, (pv, pe, _) = seen[metric]
                se = math.hypot(pe, err)
                worse = (pv - value) if higher else (value - pv)
                rows.append({"metric": metric, "from": prev_stage, "to": stage, "before": pv, "before_se": pe,
                             "after": value, "after_se": err, "worse_by": worse, "se_diff": se,
                             "flagged": worse > z * se if se > 0 else worse > 0})
            seen[metric] = (stage, (value, err, higher))
    return rows


def section_regressions(run: Path, evals: dict[str, dict]) -> list[str]:
    rows = regressions(stage_measurements(run, evals))
    if not rows:
        return ["_No metric was measured, with a stderr, by two stages: nothing to compare._", ""]
    flagged = [r for r in rows if r["flagged"]]
    lines = [f"Every metric measured with a stderr by two consecutive stages. **Flagged** when it got worse by more "
             f"than the stderr of the difference, sqrt(se_before² + se_after²) (for lower-is-better metrics such as "
             f"perplexity, bits per byte, ECE and over-refusal, worse means higher). "
             f"{len(flagged)} of {len(rows)} flagged.", "",
             "| metric | from → to | before ± se | after ± se | change | flag |", "|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: not r["flagged"]):
        change = r["after"] - r["before"]
        flag = ("**⚠ worse beyond stderr**" if r["flagged"] else
                "worse, within stderr" if r["worse_by"] > 0 else "not worse")
        lines.append(f"| {r['metric']} | {r['from']} → {r['to']} | {_score(r['before'])} ± {_score(r['before_se'])} | "
                     f"{_score(r['after'])} ± {_score(r['after_se'])} | {change:+.4g} | {flag} |")
    return lines + [""]


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
        lines.append(f"| {task} | " + " | ".join(_num(perf.get(k), fmt) for k, _, fmt in SPEED_KEYS) + " |")
    return lines + [""]


def section_samples(run: Path, summary: dict | None, per_task: int = 2) -> list[str]:
    lines = []
    for s in (summary or {}).get("samples") or []:
        if isinstance(s, dict):
            text = str(s.get("text", "")).strip().replace("\n", " ⏎ ")
            lines.append(f"- **{s.get('prompt', '')}** {text}")
    for path in sorted(run.glob("eval_*/samples_*.jsonl")):
        rows = read_metrics(path)[:per_task] if path.stat().st_size < 50_000_000 else []
        for r in rows:
            prompt = str(r.get("prompt", ""))[-160:].replace("\n", " ⏎ ")
            resp = r.get("responses")
            shown = resp[0] if isinstance(resp, list) and resp and isinstance(resp[0], str) else resp
            lines.append(f"- `{path.parent.name}/{path.stem[len('samples_'):]}` …{prompt} → {str(shown)[:160]!s}")
    return (lines or ["_No samples in this run._"]) + [""]


def section_config(run: Path) -> list[str]:
    lines = []
    for path in sorted(run.glob("*.yaml")):
        text = path.read_text(encoding="utf-8", errors="replace").rstrip()
        lines += [f"<details><summary>{path.name}</summary>", "", "```yaml", text, "```", "", "</details>", ""]
    return lines or ["_No run config (*.yaml) at the top of the run directory._", ""]


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (and RUN_DIR/plots/*.png) from what the run directory holds."""
    run = Path(run_dir)
    if not run.is_dir():
        raise LmstackError(f"run directory {run} does not exist")
    summary = _read_json(run / "summary.json")
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
