"""The table readers: CSV (streamed row by row; a broken row costs only itself) and Parquet (in batches of
1,024 rows, pyarrow needed; a corrupt row group ends the file and keeps the rows before it).

Usage:
    from lmstack.data.readers.tabular import read_csv, read_parquet
    for doc in read_csv(Path("a.csv"), ReaderConfig(path="a.csv", text_fields=["body"]), "a", stats): ...
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from lmstack.data.document import Doc
from lmstack.data.readers.config import ReaderConfig
from lmstack.data.readers.files import READ_ERRORS, open_binary, read_error_reason, utf8_error
from lmstack.data.readers.records import record_docs
from lmstack.data.readers.stats import ReadStats
from lmstack.errors import LmstackError


def read_csv(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    if (why := utf8_error(path)) is not None:
        stats.skipped_files[str(path)] = why
        return
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(cfg.max_line_bytes, 1))
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise become part of the first column's name.
        with open_binary(path) as fb, io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as f:
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
                    stats.bad_line(path, reader.line_num + 1, read_error_reason(e))
                    break
                yield from record_docs(rec, cfg, source, path, reader.line_num, stats)
    finally:
        csv.field_size_limit(old_limit)


def read_parquet(path: Path, cfg: ReaderConfig, source: str, stats: ReadStats) -> Iterator[Doc]:
    try:
        # lazy: optional extra (pyarrow)
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
            yield from record_docs(rec, cfg, source, path, row, stats)
