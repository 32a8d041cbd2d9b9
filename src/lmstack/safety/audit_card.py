"""The model card's static parts and its writers (issue 21 §7, IX.11): the model's configuration, parameter count,
tokenizer and file hashes; the data provenance and eval scores read from the pipeline reports of the run the model
came from; license and intended use; then model_card.json and model_card.md, written atomically.

Provenance is only ever read, never invented: each part the reports do not give reads
{"status": "unknown", "reason": ...}. The run is --run, or the nearest directory above the model that holds one of
RUN_MARKERS (a speedrun: data/report.json, world/manifest.json, speedrun.yaml); from it:
  data/report.json (+ data/pipeline.yaml)  sources, documents read, each filter's seen/kept/removed and why,
                                           dedup, decontamination, languages, tokens in the shards
  world/manifest.json                      the synthetic world (seed, size) and each corpus's train/val/test records
  sft/run/data.json                        the fine-tuning rows by task, train and val
  align/scores.json                        the alignment stages (DPO pairs, GRPO prompts) and held-out scores
  summary.json                             which of the run's models (base / sft / aligned) this one is

Usage:
    from lmstack.safety.audit_card import model_summary, find_run, provenance, run_scores, write_card
    card = {"model": model_summary(model_dir), "provenance": provenance(find_run(model_dir)), ...}
    write_card(card, out_dir)          # model_card.json + model_card.md
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
import yaml

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.train.checkpoint import sha256

RUN_MARKERS = ("data/report.json", "world/manifest.json", "speedrun.yaml")
CARD_FIELDS = ("license", "intended_use", "out_of_scope")
_CONFIG_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
                "position", "norm", "mlp", "activation", "attention", "n_experts", "n_experts_per_tok",
                "tie_embeddings")


def unknown(reason: str) -> dict[str, str]:
    return {"status": "unknown", "reason": reason}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"cannot read {path}: {e}") from None


# ---- the model -----------------------------------------------------------------------------------------------
def model_summary(model_dir: str | Path) -> dict[str, Any]:
    """Architecture, parameter count (summed from the stored tensors' shapes), tokenizer and every file's sha256."""
    d = Path(model_dir)
    hf = _read_json(d / "config.json") if (d / "config.json").is_file() else {}
    ours = _read_json(d / "lmstack_config.json") if (d / "lmstack_config.json").is_file() else {}
    arch = {"model_type": hf.get("model_type", "unknown"), "architectures": hf.get("architectures", [])}
    arch.update({k: ours[k] for k in _CONFIG_KEYS if k in ours})
    if not ours:  # an HF directory: its own names
        arch.update({k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "intermediate_size", "max_position_embeddings")
                     if k in hf})
    weights = sorted(d.glob("*.safetensors"))
    total, tensors = 0, 0
    for w in weights:
        try:
            with safe_open(str(w), "pt") as f:
                for name in f.keys():
                    total += math.prod(f.get_slice(name).get_shape())
                    tensors += 1
        except (SafetensorError, OSError) as e:
            raise LmstackError(f"cannot read the weights {w}: {e}") from None
    params = {"count": total, "tensors": tensors,
              "method": "arithmetic: the sum of the stored tensors' shapes in *.safetensors (tied embeddings "
                        "are stored, and counted, once)"} if weights else unknown("no *.safetensors in the model dir")
    # A pipeline's model dirs are all called "model": the parent names which one (align/model, run/model).
    name = d.resolve().name if d.resolve().name != "model" else f"{d.resolve().parent.name}/model"
    return {"name": name, "path": str(d.resolve()), "architecture": arch, "parameters": params,
            "tokenizer": tokenizer_summary(d),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                      for p in sorted(d.iterdir()) if p.is_file()}}


def tokenizer_summary(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return unknown("no tokenizer.json in the model dir")
    tj = _read_json(path)
    model = tj.get("model") or {}
    added = [t.get("content") for t in tj.get("added_tokens") or [] if t.get("special")]
    cfg = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    return {"type": model.get("type", "unknown"), "vocab": len(model.get("vocab") or {}) + len(added),
            "special_tokens": added, "chat_template": bool(cfg.get("chat_template"))}


def card_fields(model_dir: str | Path, flags: dict[str, str]) -> dict[str, dict[str, str]]:
    """license / intended_use / out_of_scope: a CLI flag, else the model dir's model_card.yaml, else its
    config.json; "unspecified" when none gives it. Each with where it came from."""
    d = Path(model_dir)
    sources: list[tuple[str, dict]] = [("--flag", flags)]
    if (d / "model_card.yaml").is_file():
        try:
            data = yaml.safe_load((d / "model_card.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise LmstackError(f"cannot read {d / 'model_card.yaml'}: {e}") from None
        if not isinstance(data, dict):
            raise LmstackError(f"{d / 'model_card.yaml'} must be a mapping of fields, got {type(data).__name__}")
        sources.append(("model_card.yaml", data))
    if (d / "config.json").is_file():
        sources.append(("config.json", _read_json(d / "config.json")))
    out = {}
    for key in CARD_FIELDS:
        found = next(((src, str(data[key])) for src, data in sources if data.get(key)), None)
        out[key] = {"value": found[1], "source": found[0]} if found else {"value": "unspecified", "source": "none"}
    return out


# ---- the run it came from ------------------------------------------------------------------------------------
def find_run(model_dir: str | Path, run: str | Path = "") -> tuple[Path | None, str]:
    """(run dir, how it was found) or (None, why not): --run, else the nearest ancestor holding a RUN_MARKER."""
    if run:
        r = Path(run)
        if not r.is_dir():
            raise LmstackError(f"--run {str(run)!r} is not a directory")
        return r, "--run"
    d = Path(model_dir).resolve()
    searched = []
    for parent in [d, *d.parents][:5]:
        searched.append(str(parent))
        if any((parent / m).is_file() for m in RUN_MARKERS):
            return parent, f"the nearest directory above the model holding {' or '.join(RUN_MARKERS)}"
    return None, f"no pipeline report ({', '.join(RUN_MARKERS)}) in the model dir or the 4 directories above it"


def _data_report(run: Path) -> dict[str, Any]:
    path = run / "data" / "report.json"
    if not path.is_file():
        return unknown(f"no data pipeline report at {path}")
    rep = _read_json(path)
    read = rep.get("read") or {}
    steps = [{"name": s.get("name"), "seen": s.get("seen"), "kept": s.get("kept"),
              "removed": (s.get("seen") or 0) - (s.get("kept") or 0), "dropped": s.get("dropped") or {},
              "modified": s.get("modified") or {}} for s in rep.get("steps") or []]
    dedup = {k: {"duplicates": v.get("duplicates"), "clusters": v.get("clusters")}
             for k, v in (rep.get("dedup") or {}).items() if isinstance(v, dict)}
    out = {"report": str(path), "documents_read": read.get("docs"), "files_read": read.get("files_read"),
           "sources": (rep.get("mixing") or {}).get("source") or unknown("the report has no source mixture"),
           "filters": steps, "dedup": dedup or unknown("the report has no dedup section"),
           "decontamination": rep.get("contamination", unknown("the report has no contamination section")),
           "languages": rep.get("languages", {}),
           "shards": {k: (rep.get("shards") or {}).get(k) for k in ("docs", "tokens")}}
    pipe = run / "data" / "pipeline.yaml"
    if pipe.is_file():
        try:
            cfg = yaml.safe_load(pipe.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise LmstackError(f"cannot read {pipe}: {e}") from None
        out["inputs"] = [{"path": i.get("path"), "source": i.get("source")} for i in cfg.get("inputs") or []]
        out["filters_enabled"] = sorted(k for k, v in (cfg.get("filters") or {}).items()
                                        if isinstance(v, dict) and v.get("enabled"))
    return out


def _world(run: Path) -> dict[str, Any]:
    path = run / "world" / "manifest.json"
    if not path.is_file():
        return unknown(f"no world manifest at {path}")
    m = _read_json(path)
    splits: dict[str, dict[str, int]] = {}
    for name, info in (m.get("files") or {}).items():
        corpus, _, split = name.rpartition("/")
        if corpus and isinstance(info, dict):
            splits.setdefault(corpus, {})[split.removesuffix(".jsonl")] = info.get("records")
    return {"manifest": str(path), "name": m.get("name"), "seed": m.get("seed"), "size": m.get("size"),
            "splits": splits}


def _finetune(run: Path) -> dict[str, Any]:
    path = run / "sft" / "run" / "data.json"
    if not path.is_file():
        return unknown(f"no fine-tuning data report at {path}")
    d = _read_json(path)
    parts = {split: d.get(split) or {} for split in ("train", "val")}
    return {"report": str(path), **{s: {"rows": p.get("rows"), "by_task": p.get("by_task")} for s, p in parts.items()}}


def _alignment(run: Path) -> dict[str, Any]:
    path = run / "align" / "scores.json"
    if not path.is_file():
        return unknown(f"no alignment report at {path}")
    d = _read_json(path)
    return {"report": str(path), "dpo": {k: (d.get("dpo") or {}).get(k) for k in ("method", "steps", "train_rows")},
            "grpo": {k: (d.get("grpo") or {}).get(k) for k in ("method", "steps", "train_prompts", "safety_prompts")},
            "settings": d.get("settings", {})}


def provenance(run: Path | None, how: str) -> dict[str, Any]:
    """Where the model's data came from, read from the run's reports; "unknown" (with the reason) where absent."""
    if run is None:
        return {"run": unknown(how), "data": unknown(how), "world": unknown(how), "finetune": unknown(how),
                "alignment": unknown(how)}
    return {"run": {"path": str(run.resolve()), "found_by": how}, "data": _data_report(run), "world": _world(run),
            "finetune": _finetune(run), "alignment": _alignment(run)}


def _numbers(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_scores(run: Path | None, model_dir: str | Path) -> dict[str, Any]:
    """The run's eval scores for this model: which of its models it is (summary.json's "models"), then that
    model's rows in sft/scores.json and align/scores.json."""
    if run is None:
        return unknown("no run found, so no pipeline scores")
    files = [p for p in (run / "sft" / "scores.json", run / "align" / "scores.json") if p.is_file()]
    if not files:
        return unknown(f"no scores files (sft/scores.json, align/scores.json) in {run}")
    role, me = None, Path(model_dir).resolve()
    if (run / "summary.json").is_file():
        models = _read_json(run / "summary.json").get("models") or {}
        role = next((r for r, p in models.items() if Path(p).resolve() == me), None)
    if role is None:
        return {"role": unknown("summary.json does not list this model among the run's models"),
                "files": [str(p) for p in files], "for_this_model": {}}
    rows = {}
    for p in files:
        data = _read_json(p)
        table = data.get("scores") if isinstance(data.get("scores"), dict) else data
        if isinstance(table.get(role), dict):
            rows[str(p.relative_to(run))] = _numbers(table[role])
    return {"role": role, "files": [str(p) for p in files], "for_this_model": rows}


# ---- the writers ----------------------------------------------------------------------------------------------
def _finite(x: Any) -> Any:
    """NaN (a rate over zero items) as null: JSON has no NaN, and null reads as "no value" everywhere."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _unknown_line(part: Any) -> str | None:
    if isinstance(part, dict) and part.get("status") == "unknown":
        return f"unknown: {part['reason']}"
    return None


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: one section per part, numbers with their stderr and n."""
    m, prov = card["model"], card["provenance"]
    gates = card["gates"]
    verdict = "PASS" if gates["passed"] else "FAIL"
    lines = [f"# Model card: {m['name']}", "",
             f"Audited {card['date']} by `lmstack audit` (lmstack {card['lmstack_version']}). Release gates: "
             f"**{verdict}** ({sum(r['status'] == 'fail' for r in gates['rows'])} failed of {len(gates['rows'])}).",
             "", "## Model", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["architecture"].items()]
    p, t = m["parameters"], m["tokenizer"]
    params = _unknown_line(p) or "{:,} ({})".format(p["count"], p["method"])
    tok = _unknown_line(t) or "{}, vocab {}, special tokens: {}{}".format(
        t["type"], t["vocab"], ", ".join(t["special_tokens"]) or "none",
        "; chat template" if t["chat_template"] else "")
    lines += [f"| parameters | {params} |", f"| tokenizer | {tok} |"]
    lines += ["", "## Data provenance", ""]
    run = prov["run"]
    lines.append("Run: " + (_unknown_line(run) or "`{}` (found by {})".format(run["path"], run["found_by"])))
    data = prov["data"]
    lines += ["", "### Pretraining data", ""]
    if _unknown_line(data):
        lines.append(_unknown_line(data))
    else:
        src = data["sources"]
        lines.append(f"- documents read: {data['documents_read']} from {data['files_read']} file(s); sources: "
                     f"{_unknown_line(src) or json.dumps(src)}")
        if data.get("inputs"):
            lines.append("- inputs: " + "; ".join(f"`{i['path']}` ({i['source']})" for i in data["inputs"]))
        if data.get("filters_enabled"):
            lines.append("- filters enabled: " + ", ".join(data["filters_enabled"]))
        dd = data["dedup"]
        lines.append("- dedup: " + (_unknown_line(dd) or "; ".join(f"{k}: {v['duplicates']} duplicates"
                                                                    for k, v in dd.items())))
        lines.append(f"- shards: {data['shards']['docs']} documents, {data['shards']['tokens']} tokens")
        lines += ["", "| step | seen | kept | removed | why |", "|---|---:|---:|---:|---|"]
        lines += [f"| {s['name']} | {s['seen']} | {s['kept']} | {s['removed']} | "
                  f"{', '.join(f'{k} {v}' for k, v in {**s['dropped'], **s['modified']}.items()) or '—'} |"
                  for s in data["filters"]]
    world = prov["world"]
    lines += ["", "### Synthetic world and splits", ""]
    if _unknown_line(world):
        lines.append(_unknown_line(world))
    else:
        lines += [f"World `{world['name']}`, seed {world['seed']}, size {world['size']}.", "",
                  "| corpus | train | val | test |", "|---|---:|---:|---:|"]
        lines += [f"| {c} | {s.get('train', '—')} | {s.get('val', '—')} | {s.get('test', '—')} |"
                  for c, s in world["splits"].items()]
    for key, title in (("finetune", "Fine-tuning data"), ("alignment", "Alignment")):
        part = prov[key]
        lines += ["", f"### {title}", "", _unknown_line(part) or "```json\n" + json.dumps(part, indent=1) + "\n```"]
    lines += ["", "## Eval scores (from the run's reports)", ""]
    ev = card["eval_scores"]
    if _unknown_line(ev):
        lines.append(_unknown_line(ev))
    else:
        role = ev["role"]
        lines.append(f"This model is the run's **{_unknown_line(role) or role}** model.")
        for src, row in ev["for_this_model"].items():
            lines += ["", f"`{src}`:", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in row.items()]
    lines += ["", "## Safety battery (measured by this audit, held-out data)", "",
              "| metric | value | ± stderr | n | what |", "|---|---:|---:|---:|---|"]
    for name, row in card["safety"].items():
        what = card["metric_descriptions"].get(name, "").replace("|", "\\|")
        if row.get("value") is None:
            lines.append(f"| {name} | — | — | — | {what}; {row.get('reason', 'not measured')} |")
        else:
            lines.append(f"| {name} | {_fmt(row['value'])} | {_fmt(row.get('stderr'))} | {_fmt(row.get('n'))} | "
                         f"{what} |")
    lines += ["", "## Gates", "", "| metric | gate | measured | ± stderr | n | status | from |",
              "|---|---|---:|---:|---:|---|---|"]
    for r in gates["rows"]:
        status = f"**{r['status']}**" + (f" ({r['reason'].removeprefix('not measured: ')})" if "reason" in r else "")
        lines.append(f"| {r['metric']} | {r['op']} {r['threshold']:g} | {_fmt(r['value'])} | {_fmt(r['stderr'])} | "
                     f"{_fmt(r['n'])} | {status} | {r['source']} |")
    lines += ["", "## License and intended use", "", "| field | value | from |", "|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {v['source']} |" for k, v in card["card_fields"].items()]
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {name} | {f['bytes']} | `{f['sha256']}` |" for name, f in m["files"].items()]
    return "\n".join(lines) + "\n"


def write_card(card: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """model_card.json and model_card.md into `out`, each written atomically."""
    card = _finite(card)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "model_card.json", json.dumps(card, indent=1, allow_nan=False) + "\n")
    atomic_write_text(d / "model_card.md", render_markdown(card))
    return d / "model_card.json", d / "model_card.md"
