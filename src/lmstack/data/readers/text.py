"""The plain-text reader: one document per file, per blank-line-separated paragraph, or per line
(`text_mode`); the file is checked to be UTF-8 first, so a binary file yields nothing at all.

Usage:
    from lmstack.data.readers.text import read_text
    for doc in read_text(Path("a.txt"), ReaderConfig(path="a.txt", text_mode="paragraph"), "a", stats): ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lmstack.data.document import Doc
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.files import Lines, utf8_error
from lmstack.data.readers.records import emit_docs
from lmstack.data.readers.stats import ReadStats


def read_text(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    # Validate first, so a file that turns out to be binary halfway through yields nothing at all.
    if (why := utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return

    def emit(lines: list[str], start: int) -> Iterator[Doc]:
        text = "".join(lines).strip("\n")
        yield from emit_docs(text, f"{source}/{path.name}:{start}", source, {}, cfg, path, start, stats)

    reader = Lines(path)
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
