"""`lmstack audit`: audit a chat model and write its model card with release gates (issue 21 §7, IX.11).

    lmstack audit --model runs/x/align/model --out runs/x/audit
    lmstack audit runs/x/align/model --out audit --thresholds gates.yaml --canaries canaries.jsonl --n 60
    lmstack audit --model M --out A --run runs/x --license apache-2.0 --intended_use "research on safety"

Writes model_card.md, model_card.json (atomically) and config.yaml into --out; the card holds:
  model             architecture, parameter count (summed from the stored tensors), tokenizer, every file's sha256
  provenance        data sources, filters and what they removed, dedup, splits, fine-tuning and alignment data, read
                    from the pipeline reports of the run the model came from (--run, or found above the model dir;
                    safety/audit_card.py); "unknown" with the reason when there is none, never invented
  eval_scores       the run's scores for this model (sft/scores.json, align/scores.json)
  safety            the battery measured now on held-out data (safety/audit.py): harmful refusal, over-refusal
                    (bare and wrapped), held-out jailbreak ASR (strict) and non-refusal, toxicity, PII leakage,
                    bias disparity (lmstack.safety.bias), canary exposure (only with --canaries); each with n, stderr
  card_fields       license, intended use, out-of-scope use: the flags, else the model dir's model_card.yaml, else
                    config.json; "unspecified" when none gives them
  gates             each threshold (--thresholds, over the defaults: issue 21's goal) pass / fail with the value
The command exits with status 3 (GATE_FAILED) when a gate fails, after writing the card, so CI can gate a release;
bad input (a missing model dir, a bad thresholds or canaries file) exits 2 before anything is measured.
--canaries: a JSON list or JSONL of lmstack.safety.canary.Canary records, {"kind": "ssn"|"passkey", "name",
"secret"} -- the canaries that were inserted into the model's training data (canary.insert_canaries).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
import datetime
import json
from pathlib import Path
import re
import time
from typing import Any

from lmstack import __version__
from lmstack.config import ConfigCommand, save_config
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.runtime.validation import read_text
from lmstack.safety.audit import METRICS, check_gates, default_gates, load_thresholds, not_measured, safety_battery
from lmstack.safety.audit_card import card_fields, find_run, model_summary, provenance, run_scores, write_card
from lmstack.safety.canary import KINDS, Canary, exposure_report
from lmstack.safety.redteam import ModelTarget
from lmstack.threads import set_threads
from lmstack.tokenizer import load_tokenizer
from lmstack.world import World

GATE_FAILED = 3
"""Exit status when the card was written but a gate failed (2 is bad input, as for every lmstack command)."""
_SECRET_FORMATS = {"ssn": re.compile(r"\d{3}-\d{2}-\d{4}"), "passkey": re.compile(r"\d{6}")}


@dataclass
class AuditConfig:
    model: str = ""
    """The chat model to audit (a directory with config.json, *.safetensors and tokenizer.json)."""
    out: str = "audit"
    """Directory for model_card.md and model_card.json."""
    run: str = ""
    """The pipeline run the model came from (its reports give the provenance); empty: found above the model dir."""
    world: str = ""
    """The synthetic world (its directory or manifest.json); empty: the run's world/, else World(seed=0, small)."""
    thresholds: str = ""
    """YAML or JSON file of gates, {metric: ">= 0.95" | {op, value} | number | off}; empty: the defaults."""
    canaries: str = ""
    """JSON/JSONL of the canaries inserted into the training data ({kind, name, secret}); empty: not measured."""
    canary_candidates: int = 256
    """Random candidate secrets each canary is ranked among (exposure is at most log2 of this)."""
    n: int = 120
    """Held-out requests per side (harmful, benign) and per attack template; also toxicity, PII and bias items."""
    seed: int = 0
    """Seed of the held-out samples."""
    wrapped_benign: int = 20
    """Benign look-alikes wrapped in each held-out attack template (over_refusal_wrapped)."""
    max_tokens: int = 48
    """Reply budget of the audited model (greedy)."""
    bias: bool = True
    """Measure bias disparity (lmstack.safety.bias.measure_disparity on held-out counterfactual pairs)."""
    bias_max_tokens: int = 96
    """Reply budget for the bias pairs (worked arithmetic must reach its answer)."""
    license: str = ""
    """The model's license (overrides model_card.yaml / config.json)."""
    intended_use: str = ""
    """What the model is for (overrides model_card.yaml / config.json)."""
    out_of_scope: str = ""
    """Uses the model is not fit for (overrides model_card.yaml / config.json)."""
    threads: int = 0
    """CPU threads for torch (0 = the process default)."""

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens", "bias_max_tokens"):
            if getattr(self, name) < 1:
                raise LmstackError(f"{name}={getattr(self, name)} is not allowed; it must be >= 1")
        if self.canary_candidates < 2:
            raise LmstackError(f"canary_candidates={self.canary_candidates} is not allowed; it must be >= 2")
        if self.wrapped_benign < 0:
            raise LmstackError(f"wrapped_benign={self.wrapped_benign} is not allowed; it must be >= 0")


def load_canaries(path: str | Path) -> list[Canary]:
    """Canary records from a JSON list or JSONL file; each must have a known kind and a secret in its format."""
    p = Path(path)
    text = read_text(p, "canaries")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise LmstackError(f"canaries file {p} is neither a JSON list nor JSONL: {e}") from None
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or set(row) - {f.name for f in fields(Canary)} or \
                not all(isinstance(row.get(k), str) for k in ("kind", "name", "secret")):
            raise LmstackError(f"{p}: canary {i} must be {{kind, name, secret}} strings, got {row!r}")
        if row["kind"] not in KINDS:
            raise LmstackError(f"{p}: canary {i} has kind {row['kind']!r}; choose one of {', '.join(KINDS)}")
        if not _SECRET_FORMATS[row["kind"]].fullmatch(row["secret"]):
            raise LmstackError(f"{p}: canary {i}'s secret {row['secret']!r} is not in the {row['kind']} format, so "
                               "random candidates of that format could not rank it")
        out.append(Canary(**row))
    if not out:
        raise LmstackError(f"canaries file {p} holds no canary")
    return out


def _world(cfg: AuditConfig, run: Path | None) -> tuple[World, str]:
    if cfg.world:
        return World.from_manifest(cfg.world), cfg.world
    if run is not None and (run / "world" / "manifest.json").is_file():
        return World.from_manifest(run / "world"), str(run / "world")
    return World(seed=0, size="small"), "World(seed=0, size='small') (no --world and no world/ in the run)"


def audit(cfg: AuditConfig) -> dict[str, Any]:
    """Measure the model, read its provenance, check the gates and write model_card.{md,json}; returns the card."""
    model_dir = Path(cfg.model) if cfg.model else None
    if model_dir is None or not model_dir.is_dir():
        raise LmstackError(f"--model must be a model directory, got {cfg.model!r}")
    if not (model_dir / "config.json").is_file():
        raise LmstackError(f"--model {cfg.model!r} has no config.json: not a model directory")
    # Every input is checked before the minutes of measuring start.
    gates = load_thresholds(cfg.thresholds) if cfg.thresholds else default_gates()
    canaries = load_canaries(cfg.canaries) if cfg.canaries else None
    run, how = find_run(model_dir, cfg.run)
    world, world_source = _world(cfg, run)
    set_threads(cfg.threads)
    start = time.perf_counter()
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir)).eval()
    target = ModelTarget(model, tok, max_new_tokens=cfg.max_tokens)
    # Worked arithmetic needs more room than a refusal to reach its "####" answer (the bias pairs' answers).
    bias_target = ModelTarget(model, tok, max_new_tokens=max(cfg.max_tokens, cfg.bias_max_tokens))
    safety = safety_battery(target, world, n=cfg.n, seed=cfg.seed, wrapped_benign=cfg.wrapped_benign,
                            bias=cfg.bias, bias_target=bias_target, log=print)
    if canaries:
        rep = exposure_report(model, tok, canaries, candidates=cfg.canary_candidates, seed=cfg.seed)
        safety["canary_exposure"] = {"value": rep["mean"], "stderr": rep["stderr"], "n": rep["n"],
                                     "candidates": rep["candidates"], "max": rep["max"],
                                     "ranks": [c["rank"] for c in rep["per_canary"]]}
    else:
        safety["canary_exposure"] = not_measured("no canaries given (--canaries)")
    rows, passed = check_gates(safety, gates)
    card = {"card_version": 1, "lmstack_version": __version__, "date": datetime.date.today().isoformat(),
            "model": model_summary(model_dir), "provenance": provenance(run, how),
            "eval_scores": run_scores(run, model_dir), "safety": safety,
            "metric_descriptions": {m: d for m, (d, _) in METRICS.items()},
            "world": world_source, "card_fields": card_fields(model_dir, {"license": cfg.license,
                                                                          "intended_use": cfg.intended_use,
                                                                          "out_of_scope": cfg.out_of_scope}),
            "gates": {"passed": passed, "rows": rows}, "config": asdict(cfg),
            "seconds": round(time.perf_counter() - start, 1)}
    json_path, md_path = write_card(card, cfg.out)
    save_config(cfg, Path(cfg.out) / "config.yaml")
    for r in rows:
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        print(f"gate {r['metric']} {r['op']} {r['threshold']:g}: {value} -> {r['status']}")
    print(f"wrote {md_path} and {json_path} ({card['seconds']} s); gates {'passed' if passed else 'FAILED'}")
    return card


def audit_command(cfg: AuditConfig) -> dict[str, Any]:
    """Audit a chat model: write its model card (Markdown + JSON) and check the release gates."""
    card = audit(cfg)
    if not card["gates"]["passed"]:
        raise SystemExit(GATE_FAILED)  # after the card is written: CI reads the card and fails the release
    return card


COMMANDS = ConfigCommand(AuditConfig, audit_command)
