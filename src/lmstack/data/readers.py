"""Readers: text files, globs and directories, JSONL (field selection), CSV, Parquet -> documents.

Readers stream: JSONL/CSV are read line by line and text files paragraph by paragraph, so memory
stays flat on big inputs. A malformed line (bad JSON, missing field, non-UTF-8 bytes) is counted and
skipped; a text file that is not valid UTF-8 is skipped whole, and `ReadStats` names it. Nothing
crashes the run. `.gz` files are read through gzip transparently.

Usage:
    from lmstack.data.readers import ReaderConfig, ReadStats, read_documents
    stats = ReadStats()
    for doc in read_documents(ReaderConfig(path="corpus/*.jsonl", text_fields=["text"]), stats):
        ...
    print(stats.to_dict())   # files read/skipped, malformed lines per file
"""
from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from lmstack.data.document import Doc, make_doc
from lmstack.errors import LmstackError

# How many line numbers per file we remember as examples of malformed lines.
MAX_LINE_EXAMPLES = 5


@dataclass
class ReaderConfig:
    """One input source: a file, a directory (read recursively) or a glob."""

    path: str = ""
    """File, directory or glob pattern (e.g. 'data/*.jsonl'). Required."""
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = "auto"
    """File format; 'auto' picks by suffix (.jsonl/.json/.ndjson, .csv, .parquet, else text)."""
    source: str = ""
    """Source name stored on each document (used by mixing weights); default: the path's stem."""
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """JSONL/CSV/Parquet fields that make up the text; several are joined with a blank line."""
    id_field: str = "id"
    """Field holding a document id, if present; otherwise ids are '<source>/<file>:<line>'."""
    meta_fields: list[str] = field(default_factory=list)
    """Extra fields copied into doc['meta'] (e.g. 'label', 'lang')."""
    text_mode: Literal["file", "paragraph", "line"] = "file"
    """For text files: one document per file, per blank-line-separated paragraph, or per line."""
    max_docs: int = 0
    """Stop after this many documents from this source (0 = no limit)."""

    def __post_init__(self) -> None:
        if self.max_docs < 0:
            raise ValueError(f"max_docs={self.max_docs} must be >= 0")
        if not self.text_fields:
            raise ValueError("text_fields must name at least one field")


@dataclass
class ReadStats:
    """What the readers saw: files read and skipped (with why), malformed lines per file."""

    files_read: int = 0
    docs: int = 0
    empty: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    malformed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def bad_line(self, path: Path, line_no: int, why: str) -> None:
        entry = self.malformed.setdefault(str(path), {"count": 0, "reasons": {}, "lines": []})
        entry["count"] += 1
        entry["reasons"][why] = entry["reasons"].get(why, 0) + 1
        if len(entry["lines"]) < MAX_LINE_EXAMPLES:
            entry["lines"].append(line_no)

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

    def to_dict(self) -> dict[str, Any]:
        return {"files_read": self.files_read, "docs": self.docs, "empty": self.empty,
                "malformed_lines": self.n_malformed, "skipped_files": dict(self.skipped_files),
                "malformed": dict(self.malformed)}


def expand_paths(pattern: str) -> list[Path]:
    """Files named by a path, a directory (recursive, hidden files skipped) or a glob; sorted."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    elif any(ch in pattern for ch in "*?["):
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    elif p.is_file():
        files = [p]
    else:
        raise LmstackError(f"reader path {pattern!r} matches no file or directory")
    return sorted(files)


def detect_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _utf8_error(path: Path) -> str | None:
    """Check a whole file decodes as UTF-8 (streaming, flat memory); return a reason or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with _open_binary(path) as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return f"not UTF-8 (byte {offset + e.start})"
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8 (truncated multi-byte character at end)"
    except (OSError, EOFError) as e:
        return f"unreadable: {e}"
    return None


def source_name(cfg: ReaderConfig) -> str:
    if cfg.source:
        return cfg.source
    stem = Path(cfg.path.rstrip("/*")).name or "input"
    return stem.split(".")[0] or "input"


def _record_doc(rec: dict, cfg: ReaderConfig, source: str, path: Path, line_no: int, stats: ReadStats) -> Doc | None:
    """Build a document from one JSON/CSV/Parquet record, or count why it is malformed."""
    parts = []
    for name in cfg.text_fields:
        value = rec.get(name)
        if value is None:
            stats.bad_line(path, line_no, f"missing_field:{name}")
            return None
        if not isinstance(value, str):
            stats.bad_line(path, line_no, f"not_text:{name}")
            return None
        parts.append(value)
    text = "\n\n".join(parts)
    if not text.strip():
        stats.empty += 1
        return None
    rid = rec.get(cfg.id_field)
    doc_id = f"{source}/{rid}" if rid is not None else f"{source}/{path.name}:{line_no}"
    meta = {k: rec[k] for k in cfg.meta_fields if k in rec}
    return make_doc(text, doc_id, source, **meta)


def read_jsonl(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.bad_line(path, line_no, "not_utf8")
                continue
            except json.JSONDecodeError:
                stats.bad_line(path, line_no, "bad_json")
                continue
            if not isinstance(rec, dict):
                stats.bad_line(path, line_no, "not_an_object")
                continue
            doc = _record_doc(rec, cfg, source, path, line_no, stats)
            if doc is not None:
                yield doc


def read_csv(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    if (why := _utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return
    row_no = 1  # row 1 is the header
    with _open_binary(path) as fb, io.TextIOWrapper(fb, encoding="utf-8", newline="") as f:
        try:
            for row_no, rec in enumerate(csv.DictReader(f), 2):
                doc = _record_doc(rec, cfg, source, path, row_no, stats)
                if doc is not None:
                    yield doc
        except csv.Error:
            # The csv module cannot resynchronise after a broken quote, so the rest of the file is lost.
            stats.bad_line(path, row_no + 1, "bad_csv")


def read_parquet(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmstackError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        stats.skipped_files[str(path)] = f"unreadable parquet: {e}"
        return
    wanted = [c for c in {*cfg.text_fields, cfg.id_field, *cfg.meta_fields} if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=wanted):
        for rec in batch.to_pylist():
            row += 1
            doc = _record_doc(rec, cfg, source, path, row, stats)
            if doc is not None:
                yield doc


def read_text(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    # Validate first, so a file that turns out to be binary halfway through yields nothing at all.
    if (why := _utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return

    def emit(lines: list[str], start: int) -> Doc | None:
        text = "".join(lines).strip("\n")
        if not text.strip():
            stats.empty += 1
            return None
        return make_doc(text, f"{source}/{path.name}:{start}", source)

    with _open_binary(path) as fb, io.TextIOWrapper(fb, encoding="utf-8") as f:
        if cfg.text_mode == "file":
            if (doc := emit([f.read()], 1)) is not None:
                yield doc
            return
        buf: list[str] = []
        start = 1
        for line_no, line in enumerate(f, 1):
            if cfg.text_mode == "line":
                if line.strip() and (doc := emit([line], line_no)) is not None:
                    yield doc
                continue
            if line.strip():
                if not buf:
                    start = line_no
                buf.append(line)
            elif buf:
                if (doc := emit(buf, start)) is not None:
                    yield doc
                buf = []
        if buf and (doc := emit(buf, start)) is not None:
            yield doc


READERS: dict[str, Callable[[Path, ReaderConfig, str, ReadStats], Iterator[Doc]]] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
}


def read_documents(cfg: ReaderConfig, stats: ReadStats | None = None) -> Iterator[Doc]:
    """Stream the documents of one source, counting what had to be skipped into `stats`."""
    if not cfg.path:
        raise LmstackError("reader config needs a 'path' (file, directory or glob)")
    stats = stats if stats is not None else ReadStats()
    source = source_name(cfg)
    n = 0
    for path in expand_paths(cfg.path):
        fmt = cfg.format if cfg.format != "auto" else detect_format(path)
        if not os.access(path, os.R_OK):
            stats.skipped_files[str(path)] = "not readable (permissions)"
            continue
        stats.files_read += 1
        for doc in READERS[fmt](path, cfg, source, stats):
            stats.docs += 1
            n += 1
            yield doc
            if cfg.max_docs and n >= cfg.max_docs:
                return


def read_all(cfgs: list[ReaderConfig], stats: ReadStats | None = None) -> Iterator[Doc]:
    """Stream every source in order."""
    stats = stats if stats is not None else ReadStats()
    for cfg in cfgs:
        yield from read_documents(cfg, stats)


def batched(docs: Iterator[Doc], size: int) -> Iterator[list[Doc]]:
    """Group a document stream into lists of `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[Doc] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
