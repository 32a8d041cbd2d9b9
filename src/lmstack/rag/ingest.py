"""Read files into `Document`s: .txt, .md, .html/.htm (text from the DOM), .pdf (pypdf), .jsonl (a `text` field
plus metadata), and whole directories (recursive, in sorted order).

A file that cannot be used (not UTF-8, an empty or unreadable PDF, an empty file, a JSONL line without text, an
unknown extension) is a counted skip with its reason in `IngestReport.skipped`, never an exception: one bad file
must not sink the ingestion of a directory. That holds for a single file given directly as well, so callers
see one behaviour; pass `strict=True` to turn the first skip into an `LmstackError` instead (for a caller that
names one file and wants it read or an error). A path that does not exist is always an error. Inside a directory, hidden files and directories (a name
starting with ".") are not read.

HTML keeps its headings as Markdown lines (`## Title`), so the recursive chunker can split on them and give
each chunk its heading path; script, style and other non-content elements are dropped.

Usage:
    from lmstack.rag.ingest import read_path
    report = read_path("docs/")
    print(len(report.documents), "documents;", len(report.skipped), "skipped")
    for path, reason in report.skipped:
        print("skipped", path, reason)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from lmstack.errors import LmstackError
from lmstack.rag.types import Document

TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf", ".jsonl")


@dataclass
class IngestReport:
    """What `read_path` found: the documents, and every file (or JSONL line) it skipped, with the reason."""
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.documents)} documents, {len(self.skipped)} skipped"


class _Skip(Exception):
    """A file (or line) that is not usable: caught by read_path and counted with its message as the reason."""


def read_path(path: str | Path, strict: bool = False) -> IngestReport:
    """Read a file or a directory (recursively, sorted) into documents. Document ids are paths relative to the
    directory given (the file name for a single file); a JSONL line's id is its `id`/`doc_id` field or
    `<path>:<line>`."""
    root = Path(path)
    if not root.exists():
        raise LmstackError(f"no such file or directory: {root}")
    report = IngestReport()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
        base = root
    else:
        files, base = [root], root.parent
    for f in files:
        rel = f.relative_to(base).as_posix()
        try:
            _read_file(f, rel, report, strict)
        except _Skip as e:
            if strict:
                raise LmstackError(f"{f}: {e}") from None
            report.skipped.append((str(f), str(e)))
    return report


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_file(f: Path, rel: str, report: IngestReport, strict: bool) -> None:
    suffix = f.suffix.lower()
    if suffix not in SUFFIXES:
        raise _Skip(f"unsupported file type {suffix or '(none)'}; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".pdf":
        text, meta = read_pdf(f)
        report.documents.append(Document(rel, text, str(f), {"format": "pdf", **meta}))
        return
    text = read_text(f)
    if suffix == ".jsonl":
        _read_jsonl(text, f, rel, report, strict)
        return
    if suffix in HTML_SUFFIXES:
        text, title = html_to_text(text)
        meta = {"format": "html", **({"title": title} if title else {})}
    else:
        meta = {"format": suffix[1:]}
    if not text.strip():
        raise _Skip("empty: no text")
    report.documents.append(Document(rel, text, str(f), meta))


def read_text(f: Path) -> str:
    """The file as strict UTF-8 (a BOM dropped, CRLF made LF); a bad byte is a skip naming its offset."""
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise _Skip(f"unreadable: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip(f"not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_pdf(f: Path) -> tuple[str, dict]:
    """The text of every page, pages separated by a blank line. An encrypted, broken or text-less PDF is a skip."""
    try:
        # lazy: guarded: pypdf is the `rag` extra; without it a PDF is a counted skip naming the package
        import pypdf
    except ImportError:
        raise _Skip("reading PDF needs pypdf: pip install 'lmstack[rag]'") from None
    try:
        reader = pypdf.PdfReader(str(f))
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("encrypted PDF (no empty password)")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except _Skip:
        raise
    except Exception as e:  # pypdf raises many types (PdfReadError, ValueError, KeyError ...) on broken files
        raise _Skip(f"unreadable PDF: {type(e).__name__}: {e}") from None
    text = "\n\n".join(p for p in pages if p)
    if not text:
        raise _Skip(f"PDF has no extractable text ({len(pages)} pages)")
    return text, {"pages": len(pages)}


def _read_jsonl(text: str, f: Path, rel: str, report: IngestReport, strict: bool) -> None:
    found = bad = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{f}:{lineno}"
        try:
            doc = _jsonl_document(line, rel, lineno, str(f))
        except _Skip as e:
            if strict:
                raise LmstackError(f"{where}: {e}") from None
            report.skipped.append((where, str(e)))
            bad += 1
            continue
        report.documents.append(doc)
        found += 1
    if not found and not bad:
        raise _Skip("empty: no JSON lines")


def _jsonl_document(line: str, rel: str, lineno: int, source: str) -> Document:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Skip(f"not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(row, dict):
        raise _Skip(f"a JSON line must be an object, got {type(row).__name__}")
    text = row.pop("text", None)
    if not isinstance(text, str) or not text.strip():
        raise _Skip("no 'text' field (or it is empty or not a string)")
    doc_id = row.pop("id", None) or row.pop("doc_id", None) or f"{rel}:{lineno}"
    return Document(str(doc_id), text, source, row)


# Elements whose text is not content; their whole subtree is dropped.
_DROP = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}
# Elements that break a line; their text stands alone.
_BLOCK = {"p", "div", "section", "article", "header", "footer", "main", "nav", "aside", "ul", "ol", "li", "dl",
          "dt", "dd", "table", "tr", "blockquote", "pre", "figure", "figcaption", "form", "hr", "br", "address",
          "details", "summary", "body", "html"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _TextExtractor(HTMLParser):
    """Collects the visible text: blocks become paragraphs, headings become Markdown heading lines."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.drop_depth = 0
        self.heading: int | None = None
        self.in_title = False
        self.title: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        self.current = []
        if text:
            self.blocks.append("#" * self.heading + " " + text if self.heading else text)

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _DROP:
            self.drop_depth += 1
        elif tag in _HEADINGS:
            self._flush()
            self.heading = _HEADINGS[tag]
        elif tag in _BLOCK or tag in ("td", "th"):
            if tag in ("td", "th"):
                self.current.append(" ")
            else:
                self._flush()

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self._flush()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _DROP:
            self.drop_depth = max(0, self.drop_depth - 1)
        elif tag in _HEADINGS:
            self._flush()
            self.heading = None
        elif tag in _BLOCK:
            self._flush()

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.drop_depth:
            self.current.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(text, title): the visible text, one paragraph per block element and `#` lines for h1-h6."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.blocks), re.sub(r"\s+", " ", "".join(parser.title)).strip()
