"""ReadStats: the bad-record ledger every reader writes to, counted by file and reason, with the first few
line numbers of each, and the long documents that were split or truncated. The reasons are listed in
lmstack.data.readers (the package docstring).

Usage:
    from lmstack.data.readers.stats import ReadStats
    stats = ReadStats()
    stats.bad_line(Path("a.jsonl"), 7, "bad_json")
    stats.dropped()      # {"bad_json": 1}: the read step's drops, for the pipeline's report
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How many line numbers per file, and how many (file, line, reason) records in all, we remember.
MAX_LINE_EXAMPLES = 5
MAX_BAD_RECORDS = 100


@dataclass
class ReadStats:
    """What the readers saw: files read and skipped (with why), bad records per file, long documents."""

    files_read: int = 0
    docs: int = 0
    empty: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    malformed: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_records: list[dict[str, Any]] = field(default_factory=list)
    """The first MAX_BAD_RECORDS bad records as {"file", "line", "reason"}, in reading order."""
    long_docs: dict[str, int] = field(default_factory=dict)
    """Documents over max_doc_chars: 'split' (documents), 'parts' (what they became), 'truncated'."""

    def bad_line(self, path: Path, line_no: int, why: str) -> None:
        entry = self.malformed.setdefault(str(path), {"count": 0, "reasons": {}, "lines": []})
        entry["count"] += 1
        entry["reasons"][why] = entry["reasons"].get(why, 0) + 1
        if len(entry["lines"]) < MAX_LINE_EXAMPLES:
            entry["lines"].append(line_no)
        if len(self.bad_records) < MAX_BAD_RECORDS:
            self.bad_records.append({"file": str(path), "line": line_no, "reason": why})

    @property
    def n_malformed(self) -> int:
        return sum(e["count"] for e in self.malformed.values())

    def dropped(self) -> dict[str, int]:
        """Drop counts by reason, in the shape of a pipeline step (files count as one each)."""
        out: dict[str, int] = {}
        for entry in self.malformed.values():
            for why, n in entry["reasons"].items():
                out[why] = out.get(why, 0) + n
        if self.skipped_files:
            out["bad_file"] = len(self.skipped_files)
        if self.empty:
            out["empty"] = self.empty
        return out

    def modified(self) -> dict[str, int]:
        """Documents the long-document rule changed, for the read step's 'changed' column."""
        return {f"{k}_long_doc": v for k, v in (("split", self.long_docs.get("split", 0)),
                                                ("truncated", self.long_docs.get("truncated", 0))) if v}

    def to_dict(self) -> dict[str, Any]:
        return {"files_read": self.files_read, "docs": self.docs, "empty": self.empty,
                "malformed_lines": self.n_malformed, "skipped_files": dict(self.skipped_files),
                "malformed": dict(self.malformed), "bad_records": list(self.bad_records),
                "long_docs": dict(self.long_docs)}
