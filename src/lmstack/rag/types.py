"""The shapes every part of retrieval-augmented generation passes around: documents, chunks, hits, and the
two roles (an embedder, a retriever) that the index, the answerer and the fact checker are written against.

Usage:
    from lmstack.rag.types import Chunk, Document, Hit
    doc = Document(doc_id="bio-17", text="Ada Ashford was born on ...", source="world/bios.jsonl")
    chunk = Chunk(chunk_id="bio-17#0", doc_id="bio-17", text=doc.text, source=doc.source, start=0, end=len(doc.text))
    hit = Hit(chunk=chunk, score=0.82, rank=1, scores={"bm25": 11.2, "dense": 0.61})

Offsets are character offsets into the document's text, so `doc.text[chunk.start:chunk.end] == chunk.text`
always holds: a citation check can point back at the exact span in the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

SEARCH_MODES = ("bm25", "dense", "hybrid")
"""What `Retriever.search` accepts as `mode`: sparse only, dense only, or both fused."""


@dataclass
class Document:
    """One source document, already read into text (HTML stripped, PDF extracted)."""
    doc_id: str
    text: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    """A span of one document: `text == document.text[start:end]`. `heading_path` holds the Markdown/HTML
    headings above the span, outermost first."""
    chunk_id: str
    doc_id: str
    text: str
    source: str = ""
    start: int = 0
    end: int = 0
    heading_path: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hit:
    """One search result. `rank` counts from 1; `scores` keeps each retriever's own score (bm25, dense,
    rerank) so a fused result can still be explained."""
    chunk: Chunk
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Embedder(Protocol):
    """Text -> L2-normalised float32 vectors. `name` and `dim` are stored in an index, which refuses to be
    searched with another embedder."""
    name: str
    dim: int

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit L2 norm."""
        ...


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a query with ranked chunks: the Index, or a test's in-memory list."""

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        ...
