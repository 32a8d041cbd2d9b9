"""ReaderConfig: one input source of the data pipeline (a file, a directory or a glob) and how to read it.

Usage:
    from lmstack.data.readers.config import ReaderConfig
    ReaderConfig(path="corpus/*.jsonl", text_fields=["title", "body"], max_doc_chars=200_000)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
