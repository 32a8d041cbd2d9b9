"""Decontamination: drop (or flag) training documents that share word n-grams with evaluation sets.

Following GPT-3's method, every evaluation item (a record of a JSONL/CSV file such as GSM8K, ARC
or HellaSwag, or an inline string) is cut into normalised word n-grams (13 by default). Their
64-bit hashes go into one sorted array, and a training document is contaminated when at least
`min_hits` of its own n-grams appear there. The report names the benchmark items that were hit.
A text shorter than n words (a short question, a QA pair) is matched whole instead, as one
L-gram, when it has at least `min_ngram` words (GPT-3 likewise shortened n for short items);
items with no text that long cannot be checked and are counted, not silently ignored.

Usage:
    from lmstack.data.decontaminate import DecontamConfig, Decontaminator
    dec = Decontaminator(DecontamConfig(paths=["../shared/data/gsm8k/test.jsonl"], strings=["..."]))
    result = dec(batch)                    # StepResult; dropped reasons 'contaminated:<benchmark>'
    dec.hits("some document text")         # ['gsm8k/test:17', ...]
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from lmstack.data.dedup.shingles import shingle_hashes, words
from lmstack.data.document import Doc, StepResult
from lmstack.errors import LmstackError

EVAL_SUFFIXES = (".jsonl", ".json", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")


@dataclass
class DecontamConfig:
    """Evaluation sets to protect and what to do with documents that overlap them."""

    enabled: bool = True
    """Run decontamination (does nothing when no eval sets are given)."""
    ngram: int = 13
    """Word n-gram length (GPT-3 used 13)."""
    min_ngram: int = 8
    """Eval texts of min_ngram..ngram-1 words are matched whole; 0 = only full n-grams."""
    paths: list[str] = field(default_factory=list)
    """JSONL/CSV files (optionally .gz) or directories of them; each record is one eval item."""
    fields: list[str] = field(default_factory=list)
    """Record fields to read; empty reads every string field (and strings inside lists)."""
    strings: list[str] = field(default_factory=list)
    """Eval texts given inline (benchmark name 'inline')."""
    min_hits: int = 1
    """A document is contaminated when at least this many of its n-grams occur in an eval set."""
    action: Literal["drop", "flag"] = "drop"
    """drop the document, or keep it with meta['contamination'] listing the items hit."""

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.min_hits < 1:
            raise ValueError("decontam.ngram and decontam.min_hits must be >= 1")
        if self.min_ngram < 0 or self.min_ngram > self.ngram:
            raise ValueError(f"decontam.min_ngram={self.min_ngram} must be in [0, ngram={self.ngram}]")


def _record_strings(rec: Any, fields: list[str]) -> list[str]:
    """The texts of one eval record: chosen fields, or every string (and string in a list)."""
    if not isinstance(rec, dict):
        return [rec] if isinstance(rec, str) else []
    values = [rec[f] for f in fields if f in rec] if fields else list(rec.values())
    out: list[str] = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(x for x in v if isinstance(x, str))
    return out


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_eval_items(path: str | Path, fields: list[str] | None = None) -> Iterator[tuple[str, str, list[str]]]:
    """(benchmark, item id, texts) for every record of an eval file or directory of files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(EVAL_SUFFIXES))
    elif path.is_file():
        files = [path]
    else:
        raise LmstackError(f"decontamination set {path} does not exist")
    for f in files:
        name = f.name.lower()
        for suffix in EVAL_SUFFIXES:
            name = name.removesuffix(suffix)
        bench = f"{f.parent.name}/{name}"
        try:
            with _open_text(f) as fh:
                if f.name.lower().removesuffix(".gz").endswith(".csv"):
                    for row, rec in enumerate(csv.DictReader(fh), 2):
                        yield bench, f"{bench}:{row}", _record_strings(rec, fields or [])
                    continue
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        raise LmstackError(f"decontamination set {f}:{line_no} is not valid JSON") from None
                    yield bench, f"{bench}:{line_no}", _record_strings(rec, fields or [])
        except UnicodeDecodeError as e:
            raise LmstackError(f"decontamination set {f} is not UTF-8 (byte {e.start})") from None


class Decontaminator:
    """An n-gram index over eval items; call it on a batch to drop or flag contaminated documents."""

    def __init__(self, cfg: DecontamConfig) -> None:
        self.cfg = cfg
        self.items: list[str] = []  # item ids, indexed by owner number
        self.too_short: dict[str, int] = {}
        self.short_lengths: set[int] = set()  # word counts of eval texts matched whole
        self.n_items: dict[str, int] = {}
        hashes: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        sources = [("inline", f"inline:{i}", [s]) for i, s in enumerate(cfg.strings)]
        for bench, item_id, texts in sources:
            self._add(bench, item_id, texts, hashes, owners)
        for p in cfg.paths:
            for bench, item_id, texts in read_eval_items(p, cfg.fields):
                self._add(bench, item_id, texts, hashes, owners)
        h = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
        o = np.concatenate(owners) if owners else np.empty(0, dtype=np.int64)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owners = h[order], o[order]

    def _add(self, bench: str, item_id: str, texts: list[str], hashes: list, owners: list) -> None:
        self.n_items[bench] = self.n_items.get(bench, 0) + 1
        n, lo = self.cfg.ngram, self.cfg.min_ngram or self.cfg.ngram
        grams = []
        for t in texts:
            length = len(words(t))
            if length >= n:
                grams.append(shingle_hashes(t, n))
            elif length >= lo:
                grams.append(shingle_hashes(t, length))  # the whole short text as one L-gram
                self.short_lengths.add(length)
        if not grams:
            self.too_short[bench] = self.too_short.get(bench, 0) + 1
            return
        g = np.unique(np.concatenate(grams))
        hashes.append(g)
        owners.append(np.full(len(g), len(self.items), dtype=np.int64))
        self.items.append(item_id)

    @property
    def size(self) -> int:
        """Number of indexed n-grams."""
        return len(self.hashes)

    def hits(self, text: str) -> tuple[list[str], int]:
        """(ids of eval items sharing an n-gram with `text`, number of the text's n-grams found)."""
        n_words = len(words(text))
        if self.size == 0:
            return [], 0
        lengths = [L for L in [self.cfg.ngram, *sorted(self.short_lengths)] if L <= n_words]
        if not lengths:
            return [], 0
        g = np.unique(np.concatenate([shingle_hashes(text, L) for L in lengths]))
        lo = np.searchsorted(self.hashes, g, side="left")
        hi = np.searchsorted(self.hashes, g, side="right")
        found = hi > lo
        if not found.any():
            return [], 0
        owners = np.unique(np.concatenate([self.owners[a:b] for a, b in zip(lo[found], hi[found])]))
        return [self.items[i] for i in owners.tolist()], int(found.sum())

    def annotate(self, batch: list[Doc]) -> list[Doc]:
        """Pure: copies of contaminated documents get meta['contamination'] = [item ids]."""
        out = []
        for doc in batch:
            items, n = self.hits(doc["text"])
            if items and n >= self.cfg.min_hits:
                doc = {**doc, "meta": {**doc["meta"], "contamination": items}}
            out.append(doc)
        return out

    def verdict(self, batch: list[Doc]) -> StepResult:
        return decontam_verdict(batch, self.cfg.action)

    def __call__(self, batch: list[Doc]) -> StepResult:
        return self.verdict(self.annotate(batch))

    def summary(self) -> dict[str, Any]:
        """What was indexed: items per benchmark, items too short to check, n-gram count."""
        return {"ngram": self.cfg.ngram, "min_ngram": self.cfg.min_ngram, "indexed_ngrams": self.size,
                "items": dict(self.n_items), "too_short": dict(self.too_short),
                "short_lengths": sorted(self.short_lengths)}


def decontam_verdict(batch: list[Doc], action: str) -> StepResult:
    """Act on `annotate`'s marks: drop (reason 'contaminated:<benchmark>') or keep and count as flagged."""
    kept, dropped, flagged = [], [], 0
    for doc in batch:
        items = doc["meta"].get("contamination")
        if not items:
            kept.append(doc)
        elif action == "drop":
            dropped.append((doc, f"contaminated:{items[0].rsplit(':', 1)[0]}"))
        else:
            kept.append(doc)
            flagged += 1
    result = StepResult(kept, dropped)
    if flagged:
        result.modified["flagged"] = flagged
    return result


def contamination_report(docs_hits: list[list[str]]) -> dict[str, Any]:
    """Per benchmark: contaminated documents, distinct items hit, a few item ids."""
    out: dict[str, dict[str, Any]] = {}
    for items in docs_hits:
        for bench in {i.rsplit(":", 1)[0] for i in items}:
            out.setdefault(bench, {"documents": 0, "items": set()})["documents"] += 1
        for i in items:
            out[i.rsplit(":", 1)[0]]["items"].add(i)
    return {b: {"documents": v["documents"], "items_hit": len(v["items"]), "examples": sorted(v["items"])[:10]}
            for b, v in sorted(out.items())}
