"""Reading a file's bytes safely: .gz transparently, a UTF-8 check that streams (flat memory), and lines with
their numbers, where an over-long line is skipped in pieces (never held whole) and a read error mid-file ends
the file but keeps what came before it.

Usage:
    from lmstack.data.readers.files import Lines, utf8_error
    lines = Lines(Path("a.jsonl.gz"), max_bytes=64 * 2**20)
    for line_no, raw in lines: ...
    lines.too_long, lines.failed      # lines skipped as too long; (line, "truncated"/"read_error") or None
"""
from __future__ import annotations

import codecs
import gzip
import zlib
from pathlib import Path
from typing import Iterator


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# What a file can raise mid-read without anything being wrong with our code: the OS (OSError,
# which includes gzip.BadGzipFile), a corrupt deflate stream (zlib.error), a .gz cut short (EOFError).
READ_ERRORS = (OSError, EOFError, zlib.error)


def read_error_reason(e: BaseException) -> str:
    return "truncated" if isinstance(e, EOFError) else "read_error"


def utf8_error(path: Path) -> str | None:
    """Check a file decodes as UTF-8 (streaming, flat memory); return a reason or None.

    A .gz cut short is not rejected here: the bytes before the cut are checked, and the reader keeps
    them and reports the truncation at its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open_binary(path) as f:
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


class Lines:
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
        with open_binary(self.path) as f:
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
                self.failed = (line_no + 1, read_error_reason(e))
