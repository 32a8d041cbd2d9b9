"""Documents and the kept/dropped accounting every pipeline step shares.

A document is a plain dict, so it crosses process boundaries and JSONL files unchanged:
    {"id": "wiki/000042", "text": "...", "source": "wiki", "meta": {"lang": "en", ...}}

Every step is a pure function over a batch: `step(batch) -> StepResult(kept, dropped)`, where
`dropped` pairs each removed document with a short reason ("too_few_words", "lang=fr", ...).
A `Report` sums these per step and reason; results from worker processes merge by addition, so
a distributed executor could run the same steps and add their counts up the same way.

Usage:
    from lmstack.data.document import make_doc, StepResult, Report
    doc = make_doc("Some text.", id="a/1", source="a")
    report = Report()
    report.record("quality", StepResult(kept=[doc], dropped=[]), seconds=0.01)
    print(report.steps["quality"].kept)   # 1
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable


Doc = dict[str, Any]
# How many dropped document ids we keep per (step, reason) as examples for the report.
EXAMPLES_PER_REASON = 3


def make_doc(text: str, id: str, source: str, **meta: Any) -> Doc:
    """A new document dict; `meta` holds everything that is not id/text/source."""
    return {"id": str(id), "text": text, "source": str(source), "meta": dict(meta)}


@dataclass
class StepResult:
    """What one step did to one batch: the documents it kept and the ones it dropped, with reasons."""

    kept: list[Doc]
    dropped: list[tuple[Doc, str]] = field(default_factory=list)
    modified: Counter = field(default_factory=Counter)
    """Changes that did not drop a document (e.g. 'email' redactions), counted by kind."""

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.dropped)


@dataclass
class StepStats:
    """Running totals for one step: documents in, kept, dropped per reason, modifications, time."""

    name: str
    seen: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    modified: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def add(self, kept: int, dropped: dict[str, int], modified: dict[str, int] | None = None,
            examples: dict[str, list[str]] | None = None, seconds: float = 0.0) -> None:
        """Add one batch's counts (from this process or a worker)."""
        self.seen += kept + sum(dropped.values())
        self.kept += kept
        for reason, n in dropped.items():
            if n:
                self.dropped[reason] = self.dropped.get(reason, 0) + n
        for kind, n in (modified or {}).items():
            if n:
                self.modified[kind] = self.modified.get(kind, 0) + n
        for reason, ids in (examples or {}).items():
            room = EXAMPLES_PER_REASON - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(ids[:max(room, 0)])
        self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(result: StepResult) -> dict[str, Any]:
    """A small, picklable summary of a StepResult's counts (what workers send back, not documents)."""
    examples: dict[str, list[str]] = {}
    for doc, reason in result.dropped:
        ids = examples.setdefault(reason, [])
        if len(ids) < EXAMPLES_PER_REASON:
            ids.append(doc["id"])
    return {"kept": len(result.kept), "dropped": dict(result.reasons()),
            "modified": dict(result.modified), "examples": examples}


class Report:
    """Per-step totals in pipeline order, plus free-form sections (language mix, clusters, shards...)."""

    def __init__(self) -> None:
        self.steps: dict[str, StepStats] = {}
        self.sections: dict[str, Any] = {}

    def step(self, name: str) -> StepStats:
        if name not in self.steps:
            self.steps[name] = StepStats(name)
        return self.steps[name]

    def record(self, name: str, result: StepResult, seconds: float = 0.0) -> None:
        """Add a StepResult computed in this process."""
        self.add_summary(name, summarize(result), seconds)

    def add_summary(self, name: str, summary: dict[str, Any], seconds: float = 0.0) -> None:
        """Add a summary made by `summarize` (e.g. returned from a worker process)."""
        self.step(name).add(summary["kept"], summary["dropped"], summary.get("modified"),
                            summary.get("examples"), seconds)

    def funnel(self) -> list[tuple[str, int, int]]:
        """(step, documents in, documents kept) in order: the numbers the funnel chart draws."""
        return [(s.name, s.seen, s.kept) for s in self.steps.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps.values()], **self.sections}


def run_steps(steps: Iterable[tuple[str, Any]], batch: list[Doc]) -> tuple[list[Doc], dict[str, dict]]:
    """Apply named steps in order to one batch; return the survivors and each step's summary.

    This is the unit of work a worker process runs: pure in, counts out.
    """
    summaries: dict[str, dict] = {}
    for name, step in steps:
        t0 = time.perf_counter()
        result = step(batch)
        summary = summarize(result)
        summary["seconds"] = time.perf_counter() - t0
        summaries[name] = summary
        batch = result.kept
    return batch, summaries
