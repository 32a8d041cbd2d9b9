"""Readers: text files, globs and directories, JSONL (field selection), CSV, Parquet -> documents.

Readers stream: JSONL/CSV are read line by line and text files paragraph by paragraph, so memory
stays flat on big inputs. Nothing in one record or one file crashes the run: each bad record is
counted, skipped and named by file and line in `ReadStats` (and so in the pipeline's report.json and
printed summary), and every good record before and after it is kept. What counts as bad, by reason:

    not_utf8          the line's bytes are not UTF-8 (a text/CSV file that is not UTF-8 is skipped whole)
    bad_json          the line is not JSON
    number_too_long   a JSON integer with more digits than Python converts (4,300 by default)
    too_deep          JSON nested deeper than the parser's recursion limit, or a meta field nested
                      deeper than MAX_META_DEPTH levels
    not_an_object     the JSON line is a list, string or number, not an object
    missing_field:F / not_text:F   a text field is absent or not a string
    lone_surrogate    text, id or meta holds an unpaired UTF-16 surrogate ("\\ud800"), which no UTF-8
                      file (clean.jsonl) and no byte-level tokenizer can hold
    nul_char          the text holds a NUL character (binary data, not prose)
    line_too_long     a JSONL line or CSV field longer than `max_line_bytes`; skipped without ever
                      holding it in memory whole
    too_long          a document longer than `max_doc_chars` when `long_docs: drop`
    bad_csv           a CSV row the csv module rejects; reading resumes at the next row
    truncated         a .gz file that ends early: the lines before the cut are kept
    read_error        the OS, gzip or pyarrow failed mid-file: what was read before is kept
A file that cannot be opened at all is listed in `skipped_files` with the reason.

Line numbers are physical lines (1 = first line) for JSONL, text and CSV (a CSV record is named by
the line it ends on), and row numbers (1 = first row) for Parquet.

Long documents (`max_doc_chars`, `long_docs`): a document longer than max_doc_chars characters is
split (default) into parts of at most max_doc_chars, each cut at the last paragraph break ("\\n\\n")
in the second half of the window, else the last line break there, else the last space or tab there,
else exactly at max_doc_chars. Parts get ids '<id>#part<k>' (k from 1). `truncate` keeps only the
first part; `drop` skips the document as a bad record. Splits and truncations are counted in the
read step's 'changed' column. This bounds the memory and time every later step spends on one document.

`.gz` files are read through gzip transparently.

Usage:
    from lmstack.data.readers import ReaderConfig, ReadStats, read_documents
    stats = ReadStats()
    for doc in read_documents(ReaderConfig(path="corpus/*.jsonl", text_fields=["text"]), stats):
        ...
    print(stats.to_dict())   # files read/skipped, bad records per file with their lines
"""
from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from lmstack.data.document import Doc, make_doc
from lmstack.errors import LmstackError

# How many line numbers per file, and how many (file, line, reason) records in all, we remember.
MAX_LINE_EXAMPLES = 5
MAX_BAD_RECORDS = 100
# Meta values are copied into every document and pickled to workers; deeper nesting is refused.
MAX_META_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    max_line_bytes: int = 64 * 2**20
    """JSONL lines and CSV fields longer than this many bytes are skipped as 'line_too_long' (read in
    pieces, never held whole). Text files have no line limit; their documents fall under max_doc_chars."""
    max_doc_chars: int = 1_000_000
    """Documents longer than this many characters are handled by `long_docs` (0 = no limit). For prose
    the default is above what the word-level quality filter keeps (100,000 words), so there a split
    changes no verdict; the char-level filter (max_chars 1M non-space) may keep parts of a document
    it would have dropped whole."""
    long_docs: Literal["split", "truncate", "drop"] = "split"
    """Over max_doc_chars: split into parts cut at paragraph, else line, else space boundaries (ids
    '<id>#part<k>'), keep only the first such part, or drop the document as a bad record."""

    def __post_init__(self) -> None:
        if self.max_docs < 0:
            raise ValueError(f"max_docs={self.max_docs} must be >= 0")
        if not self.text_fields:
            raise ValueError("text_fields must name at least one field")
        if self.max_line_bytes < 1:
            raise ValueError(f"max_line_bytes={self.max_line_bytes} must be >= 1")
        if self.max_doc_chars < 0:
            raise ValueError(f"max_doc_chars={self.max_doc_chars} must be >= 0 (0 = no limit)")


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


# What a file can raise mid-read without anything being wrong with our code: the OS (OSError,
# which includes gzip.BadGzipFile), a corrupt deflate stream (zlib.error), a .gz cut short (EOFError).
READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error_reason(e: BaseException) -> str:
    return "truncated" if isinstance(e, EOFError) else "read_error"


def _utf8_error(path: Path) -> str | None:
    """Check a file decodes as UTF-8 (streaming, flat memory); return a reason or None.

    A .gz cut short is not rejected here: the bytes before the cut are checked, and the reader keeps
    them and reports the truncation at its line."""
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
    except EOFError:
        return None
    except (OSError, zlib.error) as e:
        return f"unreadable: {type(e).__name__}"
    return None


class _Lines:
    """(line_no, bytes) for each line of a file; a read error ends the file and is kept in `failed`.

    With `max_bytes`, a longer line is reported in `too_long` and skipped in 1 MiB pieces, so it is
    never held in memory whole."""

    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.failed: tuple[int, str] | None = None
        self.too_long: list[int] = []

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        line_no = 0
        limit = -1 if self.max_bytes is None else self.max_bytes + 1
        with _open_binary(self.path) as f:
            try:
                while raw := f.readline(limit):
                    line_no += 1
                    if self.max_bytes is not None and len(raw) > self.max_bytes and not raw.endswith(b"\n"):
                        self.too_long.append(line_no)
                        while raw and not raw.endswith(b"\n"):
                            raw = f.readline(1 << 20)
                        continue
                    yield line_no, raw
            except READ_ERRORS as e:
                self.failed = (line_no + 1, _read_error_reason(e))


def source_name(cfg: ReaderConfig) -> str:
    if cfg.source:
        return cfg.source
    stem = Path(cfg.path.rstrip("/*")).name or "input"
    return stem.split(".")[0] or "input"


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


def _emit(text: str, doc_id: str, source: str, meta: dict, cfg: ReaderConfig, path: Path, line_no: int,
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


def _record_docs(rec: dict, cfg: ReaderConfig, source: str, path: Path, line_no: int,
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
    yield from _emit(text, doc_id, source, meta, cfg, path, line_no, stats)


def _parse_json(raw: bytes) -> tuple[Any, str | None]:
    """(record, None) or (None, reason) for one JSONL line."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not_utf8"
    except json.JSONDecodeError:  # a ValueError subclass, so it must come first
        return None, "bad_json"
    except ValueError:  # int('9' * 5000): Python refuses to convert integers longer than 4,300 digits
        return None, "number_too_long"
    except RecursionError:
        return None, "too_deep"


def read_jsonl(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    lines = _Lines(path, cfg.max_line_bytes)
    for line_no, raw in lines:
        for bad in lines.too_long:
            stats.bad_line(path, bad, "line_too_long")
        lines.too_long.clear()
        if not raw.strip():
            continue
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # files saved by Windows tools start with a byte-order mark
        rec, why = _parse_json(raw)
        if why is not None:
            stats.bad_line(path, line_no, why)
        elif not isinstance(rec, dict):
            stats.bad_line(path, line_no, "not_an_object")
        else:
            yield from _record_docs(rec, cfg, source, path, line_no, stats)
    for bad in lines.too_long:
        stats.bad_line(path, bad, "line_too_long")
    if lines.failed:
        stats.bad_line(path, *lines.failed)


def read_csv(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    if (why := _utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(cfg.max_line_bytes, 1))
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise become part of the first column's name.
        with _open_binary(path) as fb, io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            while True:
                before = reader.line_num
                try:
                    rec = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    # The reader resumes at the next line, so one broken row costs only itself (and it
                    # consumes a line per call, so this cannot spin). A row that fails on its first line
                    # has not been counted in line_num yet.
                    line = reader.line_num + 1 if reader.line_num == before else reader.line_num
                    stats.bad_line(path, line, "line_too_long" if "field limit" in str(e) else "bad_csv")
                    continue
                except READ_ERRORS as e:
                    stats.bad_line(path, reader.line_num + 1, _read_error_reason(e))
                    break
                yield from _record_docs(rec, cfg, source, path, reader.line_num, stats)
    finally:
        csv.field_size_limit(old_limit)


def read_parquet(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmstackError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        wanted = [c for c in {*cfg.text_fields, cfg.id_field, *cfg.meta_fields} if c in pf.schema_arrow.names]
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for corrupt files
        stats.skipped_files[str(path)] = f"unreadable parquet: {type(e).__name__}"
        return
    row = 0
    batches = pf.iter_batches(batch_size=1024, columns=wanted)
    while True:
        try:
            batch = next(batches)
            recs = batch.to_pylist()
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a corrupt row group: keep the rows read so far
            stats.bad_line(path, row + 1, f"read_error:{type(e).__name__}")
            break
        for rec in recs:
            row += 1
            yield from _record_docs(rec, cfg, source, path, row, stats)


def read_text(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    # Validate first, so a file that turns out to be binary halfway through yields nothing at all.
    if (why := _utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return

    def emit(lines: list[str], start: int) -> Iterator[Doc]:
        text = "".join(lines).strip("\n")
        yield from _emit(text, f"{source}/{path.name}:{start}", source, {}, cfg, path, start, stats)

    reader = _Lines(path)
    buf: list[str] = []
    start = 1
    for line_no, raw in reader:
        # Lines end at b"\n", which never falls inside a UTF-8 character, so each decodes on its own;
        # Windows and old Mac line ends read as "\n", as a text-mode open would give them.
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        if "\r" in line:
            line = line.replace("\r\n", "\n").replace("\r", "\n")
        if cfg.text_mode == "file":
            buf.append(line)
        elif cfg.text_mode == "line":
            if line.strip():
                yield from emit([line], line_no)
        elif line.strip():
            if not buf:
                start = line_no
            buf.append(line)
        elif buf:
            yield from emit(buf, start)
            buf = []
    if reader.failed:
        # The document the cut falls in is incomplete, so it is the bad record; earlier ones stand.
        stats.bad_line(path, *reader.failed)
    elif cfg.text_mode == "file":
        yield from emit(buf, 1)
    elif buf:
        yield from emit(buf, start)


READERS: dict[str, Callable[[Path, ReaderConfig, str, ReadStats], Iterator[Doc]]] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
}


def _read_file(path: Path, fmt: str, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    """One file's documents; a failure no reader anticipated ends this file only, and is reported."""
    n = 0
    try:
        for doc in READERS[fmt](path, cfg, source, stats):
            n += 1
            yield doc
    except LmstackError:
        raise  # a setup problem (a missing optional dependency) that every file of the run would hit
    except Exception as e:  # noqa: BLE001 - the promise is that no file stops the run
        # The type names the problem; the message is not shown, as it may quote the file's bytes.
        why = f"unreadable: {type(e).__name__}" + (f" ({e.strerror})" if isinstance(e, OSError) and e.strerror else "")
        if n == 0:
            stats.skipped_files[str(path)] = why
        else:  # line 0: somewhere after the last document yielded; the reader did not say where
            stats.bad_line(path, 0, f"read_error:{type(e).__name__}")


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
        for doc in _read_file(path, fmt, cfg, source, stats):
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
