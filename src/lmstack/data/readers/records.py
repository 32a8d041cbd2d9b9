"""The checks every reader runs on a finished record, and the long-document rule (max_doc_chars, long_docs).

A record's text is refused (counted as a bad record) when it holds a NUL character or a lone UTF-16 surrogate,
or when its meta is too deep; an empty text is counted as empty. A text longer than max_doc_chars is split
at a paragraph, else line, else space boundary in the second half of each window (ids '<id>#part<k>'),
truncated to its first part, or dropped, as `long_docs` says.

Usage:
    from lmstack.data.readers.records import emit_docs, record_docs
    docs = list(emit_docs(text, "src/a.txt:1", "src", {}, cfg, Path("a.txt"), 1, stats))
    docs = list(record_docs({"text": "..."}, cfg, "src", Path("a.jsonl"), 3, stats))
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from lmstack.data.document import Doc, make_doc
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.stats import ReadStats

# Meta values are copied into every document and pickled to workers; deeper nesting is refused.
MAX_META_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(s: str) -> bool:
    # An ASCII string (known in O(1)) cannot hold one; others are scanned once, without a copy.
    return not s.isascii() and _SURROGATE.search(s) is not None


def _meta_problem(value: Any) -> str | None:
    """'too_deep' or 'lone_surrogate' if a meta value cannot travel safely, else None (iterative walk)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            return "too_deep"
        if isinstance(v, str):
            if _has_surrogate(v):
                return "lone_surrogate"
        elif isinstance(v, dict):
            stack.extend((k, depth + 1) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return None


def _cut(text: str, start: int, limit: int) -> tuple[int, int]:
    """(end of this part, start of the next) for the window text[start:start + limit] (the split rule)."""
    hi = start + limit
    if hi >= len(text):
        return len(text), len(text)
    lo = start + limit // 2
    for sep in ("\n\n", "\n"):
        if (i := text.rfind(sep, lo, hi)) > start:
            return i, i + len(sep)
    i = max(text.rfind(" ", lo, hi), text.rfind("\t", lo, hi))
    if i > start:
        return i, i + 1
    return hi, hi


def emit_docs(text: str, doc_id: str, source: str, meta: dict, cfg: ReaderConfig, path: Path, line_no: int,
          stats: ReadStats) -> Iterator[Doc]:
    """The checks every reader shares on a finished record, then the long-document rule."""
    if not text.strip():
        stats.empty += 1
        return
    if "\x00" in text:
        stats.bad_line(path, line_no + text.count("\n", 0, text.index("\x00")), "nul_char")
        return
    if _has_surrogate(text) or _has_surrogate(doc_id):
        stats.bad_line(path, line_no, "lone_surrogate")
        return
    if (why := _meta_problem(meta)) is not None:
        stats.bad_line(path, line_no, why)
        return
    limit = cfg.max_doc_chars
    if not limit or len(text) <= limit:
        yield make_doc(text, doc_id, source, **meta)
        return
    if cfg.long_docs == "drop":
        stats.bad_line(path, line_no, "too_long")
        return
    kind = "truncated" if cfg.long_docs == "truncate" else "split"
    stats.long_docs[kind] = stats.long_docs.get(kind, 0) + 1
    start, k = 0, 0
    while start < len(text):
        end, nxt = _cut(text, start, limit)
        part = text[start:end]
        start = nxt
        if not part.strip():
            continue
        k += 1
        if cfg.long_docs == "truncate":
            yield make_doc(part, doc_id, source, **meta)
            return
        stats.long_docs["parts"] = stats.long_docs.get("parts", 0) + 1
        yield make_doc(part, f"{doc_id}#part{k}", source, **meta)


def record_docs(rec: dict, cfg: ReaderConfig, source: str, path: Path, line_no: int,
                 stats: ReadStats) -> Iterator[Doc]:
    """Documents from one JSON/CSV/Parquet record, or count why it is malformed."""
    parts = []
    for name in cfg.text_fields:
        value = rec.get(name)
        if value is None:
            stats.bad_line(path, line_no, f"missing_field:{name}")
            return
        if not isinstance(value, str):
            stats.bad_line(path, line_no, f"not_text:{name}")
            return
        parts.append(value)
    text = parts[0] if len(parts) == 1 else "\n\n".join(parts)
    rid = rec.get(cfg.id_field)
    # Only a plain scalar names a document; anything else (a list, a huge nested object) is ignored.
    doc_id = f"{source}/{rid}" if isinstance(rid, (str, int, float)) and not isinstance(rid, bool) \
        else f"{source}/{path.name}:{line_no}"
    meta = {k: rec[k] for k in cfg.meta_fields if k in rec}
    yield from emit_docs(text, doc_id, source, meta, cfg, path, line_no, stats)
