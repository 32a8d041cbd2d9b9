"""Preference data: paired JSONL rows (prompt, chosen, rejected [, confidence]) and unpaired KTO rows.

TRL's other preference rows load too (lmstack.data.trl_formats): chosen/rejected message lists with a `prompt`
message list, or without one (the implicit prompt: the messages both share from the start), whose prompt
becomes a Conversation that the chat template renders, chosen/rejected the assistant replies; and text
chosen/rejected without a prompt (the implicit prompt is their shared start, as TRL's extract_prompt cuts it).

Paired rows are what DPO/IPO/cDPO and the reward model train on; the synthetic world's
`preferences` corpus has this shape already (extra fields such as kind, label and split are kept
in `meta`). `confidence` (optional, in [0.5, 1]) is how sure the labeller was that chosen beats
rejected; trainers turn it into a per-pair weight or a per-pair label smoothing ε = 1 - confidence.

Unpaired rows (prompt, completion, label: true = desirable; TRL's conversational form with message lists too)
are what KTO trains on; paired data converts to them (`to_unpaired`: chosen -> desirable, rejected ->
undesirable), as TRL does.

Bad rows lose nothing silently: a row missing its chosen or rejected text, with a non-string field
or an unparsable line is counted and skipped, and `report()` says how many and where. A file with
no usable row at all is an error.

Usage:
    from lmstack.align.preference_data import load_preferences, to_unpaired
    data = load_preferences("prefs.jsonl")
    print(data.report())          # "loaded 980 pairs from prefs.jsonl; skipped 20: missing rejected 15 (lines 3, ...)"
    pairs = data.pairs            # [Pair(prompt, chosen, rejected, confidence, meta), ...]
    rows = to_unpaired(pairs)     # [Unpaired(prompt, completion, label, meta), ...]
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmstack.config import atomic_write_text
from lmstack.data.trl_formats import Conversation, preference_row, to_messages, unpaired_row
from lmstack.errors import LmstackError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    prompt: str | Conversation
    """Text (one user turn), or the turns of a conversational row (lmstack.data.trl_formats)."""
    chosen: str
    rejected: str
    confidence: float = 1.0
    """Probability that chosen really is better (1 = certain)."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Unpaired:
    prompt: str | Conversation
    completion: str
    label: bool
    """True = desirable."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loaded:
    """What a loader kept, and a tally of what it skipped and why (reason -> line numbers)."""

    path: str
    rows: list
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def pairs(self) -> list:
        return self.rows

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def report(self) -> str:
        msg = f"loaded {len(self.rows)} rows from {self.path}"
        if not self.skipped:
            return msg + "; skipped none"
        parts = []
        for reason, lines in sorted(self.skipped.items()):
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            parts.append(f"{reason} {len(lines)} (line{'s' if len(lines) > 1 else ''} {shown})")
        return f"{msg}; skipped {self.n_skipped}: " + "; ".join(parts)


def _read_lines(path: str | os.PathLike) -> Iterable[tuple[int, str]]:
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"no preference file at {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmstackError(f"{p} is not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def pair_from_row(row: dict) -> tuple[Pair | None, str | None]:
    """A Pair from one dict, or (None, reason) for a row that must be skipped."""
    implicit = "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
    if implicit or any(isinstance(row.get(name), list) for name in PAIR_FIELDS):  # TRL's other preference rows
        try:
            prompt, chosen, rejected = preference_row(row)
        except LmstackError as e:
            return None, str(e)
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                return None, f"missing {name}"
    else:
        for name in PAIR_FIELDS:
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return None, f"missing {name}"
            if not isinstance(value, str):
                return None, f"non-string {name}"
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    conf = row.get("confidence", 1.0)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 <= conf <= 1.0:
        return None, "confidence outside [0.5, 1]"
    meta = {k: v for k, v in row.items() if k not in PAIR_FIELDS + ("confidence",)}
    return Pair(prompt, chosen, rejected, float(conf), meta), None


def pairs_from_records(records: Iterable[dict], source: str = "<records>") -> Loaded:
    """Pairs from in-memory dicts (e.g. World(...).corpus("preferences")), with the same skipping rules."""
    kept, skipped = [], defaultdict(list)
    for n, row in enumerate(records, 1):
        pair, why = pair_from_row(row) if isinstance(row, dict) else (None, "not a JSON object")
        if pair is None:
            skipped[why].append(n)
        else:
            kept.append(pair)
    return Loaded(source, kept, dict(skipped))


def load_preferences(path: str | os.PathLike, split: str | None = None) -> Loaded:
    """Read paired JSONL; rows with a `split` field other than `split` are left out (not counted as bad)."""
    def rows():
        for n, line in _read_lines(path):
            row = _parse(line)
            if row is None or split is None or row.get("split", split) == split:
                yield n, row

    kept, skipped = [], defaultdict(list)
    for n, row in rows():
        pair, why = pair_from_row(row) if row is not None else (None, "unparsable JSON")
        if pair is None:
            skipped[why].append(n)
        else:
            kept.append(pair)
    out = Loaded(str(path), kept, dict(skipped))
    if not kept:
        raise LmstackError(f"{path} has no usable preference pair ({out.report()}); rows need string fields "
                           f"{', '.join(PAIR_FIELDS)}, or TRL's conversational chosen/rejected message lists "
                           "(with or without a prompt)")
    return out


def load_unpaired(path: str | os.PathLike, split: str | None = None) -> Loaded:
    """Read KTO rows (prompt, completion, label); paired rows in the same file are split into two."""
    kept, skipped = [], defaultdict(list)
    for n, line in _read_lines(path):
        row = _parse(line)
        if row is None:
            skipped["unparsable JSON"].append(n)
            continue
        if split is not None and row.get("split", split) != split:
            continue
        if "completion" not in row and any(k in row for k in ("chosen", "rejected")):
            pair, why = pair_from_row(row)
            if pair is None:
                skipped[why].append(n)
            else:
                kept.extend(to_unpaired([pair]))
            continue
        if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):  # TRL conversational
            try:
                prompt, completion, label = unpaired_row(row)
            except LmstackError as e:
                skipped[str(e)].append(n)
                continue
            if not completion.strip():
                skipped["missing completion"].append(n)
            else:
                meta = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label")}
                kept.append(Unpaired(prompt, completion, label, meta))
            continue
        prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
        if not isinstance(prompt, str) or not prompt.strip():
            skipped["missing prompt"].append(n)
        elif not isinstance(completion, str) or not completion.strip():
            skipped["missing completion"].append(n)
        elif not isinstance(label, bool):
            skipped["label not true/false"].append(n)
        else:
            meta = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label")}
            kept.append(Unpaired(prompt, completion, label, meta))
    out = Loaded(str(path), kept, dict(skipped))
    if not kept:
        raise LmstackError(f"{path} has no usable KTO row ({out.report()}); rows need prompt, completion and a "
                           "true/false label (or prompt, chosen, rejected)")
    return out


def to_unpaired(pairs: Iterable[Pair]) -> list[Unpaired]:
    """Each pair becomes a desirable (chosen) and an undesirable (rejected) row."""
    out = []
    for p in pairs:
        out.append(Unpaired(p.prompt, p.chosen, True, dict(p.meta)))
        out.append(Unpaired(p.prompt, p.rejected, False, dict(p.meta)))
    return out


def write_preferences(pairs: Iterable[Pair | dict], path: str | os.PathLike) -> Path:
    """Write pairs (or dicts) as JSONL, atomically."""
    lines = []
    for p in pairs:
        prompt = p.prompt if isinstance(p, dict) or isinstance(p.prompt, str) else to_messages(p.prompt)
        row = p if isinstance(p, dict) else {"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected,
                                             "confidence": p.confidence, **p.meta}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
