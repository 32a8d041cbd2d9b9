"""The report sections read straight from a run directory's files: the run's summary (summary.json), the
data pipeline's funnel (data/report.json), the tokenizer (tokenizer/, with bytes per token measured on a
sample of data/clean.jsonl), samples (summary.json and eval_*/samples_*.jsonl) and the run config (*.yaml).

Each section returns markdown lines, or a one-line note when its input is missing.

Usage:
    from lmstack.eval.report.run_sections import section_data
    lines = section_data(Path("runs/x"))     # the funnel table, or "_No data pipeline report ..._"
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.eval.plots import read_metrics
from lmstack.eval.report.common import fmt_num, read_json


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
        lines += ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {fmt_num(v, '{:.1f}')} |" for k, v in timings.items()]
        lines.append("")
    return lines


def section_data(run: Path) -> list[str]:
    report = read_json(run / "data" / "report.json")
    if not isinstance(report, dict) or not report.get("steps"):
        return ["_No data pipeline report (data/report.json)._", ""]
    lines = ["| step | seen | kept | kept % | dropped (reason: count) | seconds |", "|---|---:|---:|---:|---|---:|"]
    for s in report["steps"]:
        seen, kept = s.get("seen", 0), s.get("kept", 0)
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted((s.get("dropped") or {}).items(), key=lambda kv: -kv[1]))
        pct = f"{100 * kept / seen:.1f}" if seen else "—"
        lines.append(f"| {s.get('name', '?')} | {seen:,} | {kept:,} | {pct} | {dropped or '—'} | "
                     f"{fmt_num(s.get('seconds'), '{:.1f}')} |")
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
        # lazy: guarded: any failure here, the import included, only drops this section
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
    cfg = read_json(tok_dir / "tokenizer_config.json")
    tok_json = read_json(tok_dir / "tokenizer.json")
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
