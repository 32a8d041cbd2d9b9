"""Split a `Document` into `Chunk`s that keep their source, exact character offsets and heading path.

Three methods, one unit: `size` and `overlap` count tokens, which are whitespace-separated words by default
(a run of non-space characters, cut every 64 characters so a line without spaces still splits) or the tokens
of a given tokenizer, mapped back to character offsets.
- `tokens`: fixed windows of `size` tokens, each starting `size - overlap` tokens after the last.
- `sentences`: whole sentences packed greedily up to `size` tokens; trailing sentences up to `overlap` tokens
  are repeated at the start of the next chunk. A sentence longer than `size` falls back to token windows.
- `recursive` (default): sections by Markdown headings (`# ...`; HTML headings arrive in that form from
  ingest), and inside a section too large for one chunk, paragraphs, then lines, then sentences, then token
  windows, each level used only where the one above leaves a piece too large; the pieces are then packed as
  sentences are. A chunk never spans two sections.
Whatever the method, no chunk is longer than `max_chars` characters (a last guard for text such as one 50 MB
line of a single token), and `doc.text[chunk.start:chunk.end] == chunk.text` always holds.

Usage:
    from lmstack.rag.chunking import ChunkConfig, chunk_document
    chunks = chunk_document(doc, method="sentences", size=128, overlap=16)
    chunks = ChunkConfig(method="tokens", size=64, overlap=8).chunk(doc, tokenizer=lmstack.load_tokenizer(d))
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterator

from lmstack.errors import LmstackError
from lmstack.rag.types import Chunk, Document

METHODS = ("recursive", "tokens", "sentences")
_WORD = re.compile(r"\S{1,64}")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")
# a sentence ends at . ! ? (with closing quotes or brackets) followed by space, or at a blank line
_SENTENCE = re.compile(r"[.!?]+[\"')\]]*\s+|\n[ \t]*\n\s*")
_COUNT_CHARS = 200_000  # spans shorter than this are counted with one findall; longer ones stop at the limit


@dataclass
class ChunkConfig:
    """How documents are cut into chunks."""
    method: str = "recursive"
    """recursive (headings, paragraphs, lines, sentences, token windows) | tokens (fixed windows) |
    sentences (sentence packing)"""
    size: int = 200
    """Tokens per chunk at most (whitespace words, or the given tokenizer's tokens)."""
    overlap: int = 40
    """Tokens repeated between neighbouring chunks (0 <= overlap < size)."""
    max_chars: int = 4000
    """Hard cap on a chunk's characters, whatever its token count."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise LmstackError(f"chunk method {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.size, int) or self.size < 1:
            raise LmstackError(f"chunk size must be a positive integer, got {self.size!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size:
            raise LmstackError(f"chunk overlap must be an integer in [0, size={self.size}), got {self.overlap!r}")
        if not isinstance(self.max_chars, int) or self.max_chars < 16:
            raise LmstackError(f"chunk max_chars must be an integer >= 16, got {self.max_chars!r}")

    def chunk(self, doc: Document, tokenizer: Any = None) -> list[Chunk]:
        return _Chunker(doc, self, tokenizer).run()

    def to_dict(self) -> dict:
        return {"method": self.method, "size": self.size, "overlap": self.overlap, "max_chars": self.max_chars}


def chunk_document(doc: Document, method: str = "recursive", size: int = 200, overlap: int = 40,
                   max_chars: int = 4000, tokenizer: Any = None) -> list[Chunk]:
    """The chunks of one document, in order; ids are `<doc_id>#<n>`, metadata is the document's."""
    return ChunkConfig(method, size, overlap, max_chars).chunk(doc, tokenizer)


def chunk_documents(docs: list[Document], config: ChunkConfig | None = None, tokenizer: Any = None) -> list[Chunk]:
    config = config or ChunkConfig()
    return [c for d in docs for c in config.chunk(d, tokenizer)]


def tokenizer_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans of a tokenizer's tokens: an lmstack Tokenizer (through its fast runtime) or a
    `tokenizers.Tokenizer`; both report offsets, which is what maps ids back to the text."""
    fast = tokenizer.fast() if hasattr(tokenizer, "fast") else tokenizer
    encode = getattr(fast, "encode", None)
    enc = encode(text, add_special_tokens=False) if encode is not None else None
    offsets = getattr(enc, "offsets", None)
    if offsets is None:
        raise LmstackError(f"tokenizer {type(tokenizer).__name__} gives no character offsets; chunk by "
                           "whitespace words (no tokenizer) or pass a tokenizer.json-backed tokenizer")
    return [(s, e) for s, e in offsets if e > s]


class _Chunker:
    """One document's chunking: the token spans, the heading index, and the three methods."""

    def __init__(self, doc: Document, config: ChunkConfig, tokenizer: Any):
        self.doc, self.text, self.cfg = doc, doc.text, config
        self.offsets = tokenizer_offsets(tokenizer, doc.text) if tokenizer is not None else None
        self.starts = [s for s, _ in self.offsets] if self.offsets is not None else None
        self.headings = _heading_index(doc.text)

    # --- tokens ---
    def spans(self, s: int, e: int) -> Iterator[tuple[int, int]]:
        if self.offsets is None:
            return (m.span() for m in _WORD.finditer(self.text, s, e))
        i = bisect.bisect_left(self.starts, s)
        return (o for o in self.offsets[i:bisect.bisect_left(self.starts, e)] if o[1] <= e)

    def count(self, s: int, e: int, limit: int) -> int:
        """Tokens in [s, e), exact up to limit + 1 (a huge span stops counting once it is over the limit)."""
        if self.offsets is None and e - s < _COUNT_CHARS:
            return len(_WORD.findall(self.text, s, e))
        n = 0
        for _ in self.spans(s, e):
            n += 1
            if n > limit:
                break
        return n

    def windows(self, s: int, e: int) -> Iterator[tuple[int, int, int]]:
        """Windows of `size` tokens stepping `size - overlap`, streamed: (start, end, tokens)."""
        size, step = self.cfg.size, self.cfg.size - self.cfg.overlap
        buf: list[tuple[int, int]] = []
        fresh = 0  # tokens in buf not yet in an emitted window
        for span in self.spans(s, e):
            buf.append(span)
            fresh += 1
            if len(buf) == size:
                yield buf[0][0], buf[-1][1], size
                del buf[:step]
                fresh = 0
        if fresh:
            yield buf[0][0], buf[-1][1], len(buf)

    # --- splitting ---
    def split(self, pattern: re.Pattern, s: int, e: int) -> list[tuple[int, int]]:
        parts, at = [], s
        for m in pattern.finditer(self.text, s, e):
            parts.append((at, m.end()))
            at = m.end()
        parts.append((at, e))
        return [p for p in (self.trim(a, b) for a, b in parts) if p[1] > p[0]]

    def trim(self, s: int, e: int) -> tuple[int, int]:
        text = self.text
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        return s, e

    def fit(self, s: int, e: int, levels: tuple[re.Pattern, ...]) -> list[tuple[int, int, int]]:
        """Pieces of [s, e) of at most `size` tokens: the span itself, or its parts at the first level that
        splits it, recursively; token windows at the bottom."""
        n = self.count(s, e, self.cfg.size)
        if n <= self.cfg.size:
            return [(s, e, n)] if n else []
        for k, pattern in enumerate(levels):
            parts = self.split(pattern, s, e)
            if len(parts) > 1:
                return [p for a, b in parts for p in self.fit(a, b, levels[k + 1:])]
        return list(self.windows(s, e))

    def pack(self, pieces: list[tuple[int, int, int]]) -> Iterator[tuple[int, int]]:
        """Greedy packing up to `size` tokens; the last pieces of a chunk, up to `overlap` tokens, open the next."""
        size, overlap = self.cfg.size, self.cfg.overlap
        cur: list[tuple[int, int, int]] = []
        total = 0
        for p in pieces:
            if cur and total + p[2] > size:
                yield cur[0][0], cur[-1][1]
                keep, kept = [], 0
                for q in reversed(cur):
                    if kept + q[2] > overlap or kept + q[2] + p[2] > size:
                        break
                    keep.insert(0, q)
                    kept += q[2]
                cur, total = keep, kept
            cur.append(p)
            total += p[2]
        if cur:
            yield cur[0][0], cur[-1][1]

    def cap(self, s: int, e: int) -> Iterator[tuple[int, int]]:
        """[s, e) in pieces of at most max_chars, cut at the last whitespace of each piece's second half."""
        limit = self.cfg.max_chars
        while e - s > limit:
            cut = s + limit
            space = max(self.text.rfind(" ", s + limit // 2, cut), self.text.rfind("\n", s + limit // 2, cut))
            if space > s:
                cut = space
            a, b = self.trim(s, cut)
            if b > a:
                yield a, b
            s = cut
        a, b = self.trim(s, e)
        if b > a:
            yield a, b

    # --- methods ---
    def spans_of_method(self) -> Iterator[tuple[int, int]]:
        method, n = self.cfg.method, len(self.text)
        if method == "tokens":
            yield from ((s, e) for s, e, _ in self.windows(0, n))
        elif method == "sentences":
            yield from self.pack(self.fit_sentences(0, n))
        else:
            for s, e in _sections(self.text):
                yield from self.pack(self.fit(s, e, (_PARAGRAPH, _LINE, _SENTENCE)))

    def fit_sentences(self, s: int, e: int) -> list[tuple[int, int, int]]:
        return [p for a, b in self.split(_SENTENCE, s, e) for p in self.fit(a, b, ())]

    def run(self) -> list[Chunk]:
        doc, out = self.doc, []
        for s0, e0 in self.spans_of_method():
            for s, e in self.cap(s0, e0):
                out.append(Chunk(chunk_id=f"{doc.doc_id}#{len(out)}", doc_id=doc.doc_id, text=self.text[s:e],
                                 source=doc.source, start=s, end=e, heading_path=self.heading_path(s),
                                 metadata=dict(doc.metadata)))
        return out

    def heading_path(self, pos: int) -> tuple[str, ...]:
        i = bisect.bisect_right(self.headings[0], pos) - 1
        return self.headings[1][i] if i >= 0 else ()


def _heading_index(text: str) -> tuple[list[int], list[tuple[str, ...]]]:
    """(start of each heading line, the heading path in force from there), for bisecting a chunk's path."""
    positions, paths, stack = [], [], []
    for m in _HEADING.finditer(text):
        level = len(m.group(1))
        stack = [(lv, t) for lv, t in stack if lv < level] + [(level, m.group(2))]
        positions.append(m.start())
        paths.append(tuple(t for _, t in stack))
    return positions, paths


def _sections(text: str) -> list[tuple[int, int]]:
    """Spans from one heading line to the next (text before the first heading is its own section)."""
    cuts = [0] + [m.start() for m in _HEADING.finditer(text)] + [len(text)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
