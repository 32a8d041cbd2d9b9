"""Training corpora: read files or in-memory texts strictly, and count pre-token words.

Reading is strict UTF-8: a bad byte raises an error naming the file and the byte offset, unless
`invalid_utf8="skip"`, which drops the offending lines and reports how many. Counting reduces the corpus to
unique pre-token words with frequencies, which is all a BPE/WordPiece/Unigram trainer needs. The regex split
runs over whole chunks and `collections.Counter` does the counting in C; the per-piece tail of the
pre-tokenizer (e.g. the byte-level mapping) then runs once per *unique* piece, not once per occurrence.

Usage:
    texts, stats = read_corpus(["a.txt", "b.txt"], invalid_utf8="skip")   # stats["skipped_lines"]
    counts = count_words(texts, normalizer, pre_tokenizer)                   # {"Ġthe": 1234, ...}
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
import os
from pathlib import Path
from typing import Iterable

from lmstack.errors import LmstackError
from lmstack.tokenizer.pretokenizers import split_counting_stages

_CHUNK = 1 << 20  # characters per counting chunk (cut at a newline)
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv", ".py", ".gz", ".raw")


def _looks_like_path(s: str) -> bool:
    return bool(s) and not any(c.isspace() for c in s) and (os.sep in s or s.lower().endswith(_TEXT_SUFFIXES))


def _read_file(path: Path, invalid_utf8: str) -> tuple[str, int]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmstackError(f"cannot read training file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if invalid_utf8 != "skip":
            raise LmstackError(f"training file {path} is not valid UTF-8: bad byte at offset {e.start} "
                               "(pass invalid_utf8='skip' to drop such lines)") from None
    kept, skipped = [], 0
    for line in data.split(b"\n"):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            skipped += 1
    return "\n".join(kept), skipped


def read_corpus(sources: Iterable[str | os.PathLike] = (), invalid_utf8: str = "error",
                texts: Iterable[str] = ()) -> tuple[list[str], dict]:
    """Files (paths) and texts (strings that are not existing files, plus everything in `texts`)
    -> (texts, stats)."""
    if invalid_utf8 not in ("error", "skip"):
        raise LmstackError(f"invalid_utf8={invalid_utf8!r}; allowed: 'error', 'skip'")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out, stats = [], {"files": 0, "texts": 0, "skipped_lines": 0, "chars": 0}
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise LmstackError(f"texts[{k}] must be a str, got {type(t).__name__}")
        out.append(t)
        stats["texts"] += 1
        stats["chars"] += len(t)
    for src in sources:
        if isinstance(src, os.PathLike) or (isinstance(src, str) and os.path.isfile(src)):
            path = Path(src)
            if not path.is_file():
                raise LmstackError(f"training file not found: {path}")
            text, skipped = _read_file(path, invalid_utf8)
            stats["files"] += 1
            stats["skipped_lines"] += skipped
        elif isinstance(src, str):
            if _looks_like_path(src):
                raise LmstackError(f"training file not found: {src}")
            text = src
            stats["texts"] += 1
        else:
            raise LmstackError(f"corpus items must be file paths or strings, got {type(src).__name__}")
        out.append(text)
        stats["chars"] += len(text)
    if not any(t.strip() for t in out):
        raise LmstackError(f"the training corpus is empty ({stats['files']} files, {stats['texts']} texts, "
                           "no non-whitespace text)")
    return out, stats


def chunks(texts: list[str], size: int = _CHUNK) -> list[str]:
    out = []
    for t in texts:
        start = 0
        while start < len(t):
            end = t.find("\n", start + size)
            end = len(t) if end == -1 else end + 1
            out.append(t[start:end])
            start = end
    return out


_STATE: tuple = ()  # (chunks, normalizer, head), inherited by forked counting workers


def _count_chunk(i: int) -> Counter:
    parts, normalizer, head = _STATE
    chunk = parts[i]
    return Counter(head(normalizer(chunk) if normalizer else chunk))


def count_words(texts: list[str], normalizer, pre_tokenizer, num_workers: int = 1,
                drop: Iterable[str] = ()) -> dict[str, int]:
    """Unique pre-token words -> frequency. `drop` strings (special tokens) are cut out of the text first."""
    global _STATE
    head, tail = split_counting_stages(pre_tokenizer)
    parts = chunks(texts)
    for d in drop:
        parts = [p.replace(d, "\n") for p in parts]
    counts: Counter = Counter()
    if num_workers > 1 and len(parts) > 1:
        # Fork shares the chunks and the pre-tokenizer with the workers; only the counters travel back.
        _STATE = (parts, normalizer, head)
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as ex:
                for c in ex.map(_count_chunk, range(len(parts))):
                    counts.update(c)
        finally:
            _STATE = ()
    else:
        for p in parts:
            counts.update(head(normalizer(p) if normalizer else p))
    if tail is None:
        return dict(counts)
    out: dict[str, int] = {}
    for w, c in counts.items():
        t = tail(w)
        out[t] = out.get(t, 0) + c
    return out
