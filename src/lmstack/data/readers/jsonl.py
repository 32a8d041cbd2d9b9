"""The JSONL reader: one JSON object per line, streamed line by line; each bad line is counted by reason
(not_utf8, bad_json, number_too_long, too_deep, not_an_object, line_too_long) and skipped.

Usage:
    from lmstack.data.readers.jsonl import read_jsonl
    for doc in read_jsonl(Path("a.jsonl"), ReaderConfig(path="a.jsonl"), "a", stats): ...
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from lmstack.data.document import Doc
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.files import Lines
from lmstack.data.readers.records import record_docs
from lmstack.data.readers.stats import ReadStats


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
    lines = Lines(path, cfg.max_line_bytes)
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
            yield from record_docs(rec, cfg, source, path, line_no, stats)
    for bad in lines.too_long:
        stats.bad_line(path, bad, "line_too_long")
    if lines.failed:
        stats.bad_line(path, *lines.failed)
