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

This module finds the files and picks a reader per file (READERS); the rest lives in one module per concept:
config.py (ReaderConfig), stats.py (ReadStats, the bad-record ledger), files.py (bytes, lines, UTF-8 checks),
records.py (the checks every record passes and the long-document rule), and the readers of each format family,
jsonl.py, tabular.py (CSV, Parquet) and text.py.

Usage:
    from lmstack.data.readers import read_documents
    from lmstack.data.readers.config import ReaderConfig
    from lmstack.data.readers.stats import ReadStats
    stats = ReadStats()
    for doc in read_documents(ReaderConfig(path="corpus/*.jsonl", text_fields=["text"]), stats):
        ...
    print(stats.to_dict())   # files read/skipped, bad records per file with their lines
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterator

from lmstack.data.document import Doc
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.jsonl import read_jsonl
from lmstack.data.readers.stats import ReadStats
from lmstack.data.readers.tabular import read_csv, read_parquet
from lmstack.data.readers.text import read_text
from lmstack.errors import LmstackError


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


def source_name(cfg: ReaderConfig) -> str:
    if cfg.source:
        return cfg.source
    stem = Path(cfg.path.rstrip("/*")).name or "input"
    return stem.split(".")[0] or "input"


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
