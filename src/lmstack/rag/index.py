"""The Index: documents chunked, embedded and stored, searched by BM25, by dense vectors, or by both fused.

One interface over three backends (`backend=`):
- `sqlite` (default): one SQLite file, exact numpy search (rag/store.py);
- `faiss`: the same file for chunks and vectors, plus a FAISS HNSW or IVF-PQ index beside it for large
  collections (rag/faiss_store.py);
- `pgvector`: Postgres with the pgvector extension, for collections shared by several processes or servers
  (rag/pgvector_store.py); `path` is then a DSN, `postgresql://user@host:port/db`.
BM25 (rag/bm25.py) is kept in memory, built from the stored chunk texts on the first sparse query and kept in
step with the store's generation, so a write by another process is seen here too.

Search modes: `bm25`, `dense`, `hybrid` (reciprocal-rank fusion of the two by default, or `fusion="blend"`, a
weighted min-max blend); `rerank` takes any object with `.rerank(query, hits, k)` (such as
rag.rerank.LMReranker) or a function of the same arguments, applied to the top `candidates` hits.

The index records the embedder's name and dimension (and how to load it, when it was given by name) and the
chunking config: it refuses an embedder whose name or dimension differs, naming both, and `add`/`update` cut
new documents the way the first ones were cut.

A build is atomic: the files are written under a temporary name beside `path` and moved into place at the end,
so a crashed build leaves nothing half made.

Usage:
    from lmstack.rag.index import Index
    from lmstack.rag.ingest import read_path
    idx = Index.build(read_path("docs/").documents, "minilm", path="idx")
    idx = Index.open("idx")                        # another process: the embedder is loaded from its name
    hits = idx.search("Where was Ada born?", k=5, mode="hybrid")
    idx.add([doc]); idx.update(doc); idx.delete("bio-17")
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.rag.bm25 import BM25
from lmstack.rag.chunking import ChunkConfig
from lmstack.rag.embed import load_embedder
from lmstack.rag.faiss_store import FaissStore
from lmstack.rag.hybrid import blend, rrf
from lmstack.rag.pgvector_store import PgVectorStore
from lmstack.rag.store import SQLiteStore, VectorStore
from lmstack.rag.types import SEARCH_MODES, Chunk, Document, Embedder, Hit

BACKENDS = ("sqlite", "faiss", "pgvector")
FUSIONS = ("rrf", "blend")
DB_NAME = "index.db"
_DSN_PREFIXES = ("postgresql://", "postgres://")


def _resolve_embedder(embedder: Embedder | str | os.PathLike | None) -> tuple[Embedder | None, str | None]:
    """(embedder, spec to reload it by): a name such as "minilm" or an encoder directory is loaded."""
    if embedder is None or isinstance(embedder, Embedder):
        return embedder, None
    spec = str(embedder)
    return load_embedder(spec), (spec if spec == "minilm" else str(Path(spec).resolve()))


def _open_store(path: str | os.PathLike | None, backend: str, name: str | None, dim: int | None,
                options: dict) -> VectorStore:
    if backend not in BACKENDS:
        raise LmstackError(f"index backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "pgvector":
        if path is None:
            raise LmstackError("the pgvector backend needs path= a Postgres DSN, e.g. postgresql://user@host/db")
        return PgVectorStore(str(path), name=name, dim=dim, **options)
    db = ":memory:" if path is None else Path(path) / DB_NAME
    if backend == "faiss":
        return FaissStore(db, name=name, dim=dim, **options)
    return SQLiteStore(db, name=name, dim=dim, **options)


def _is_dsn(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(_DSN_PREFIXES)


class Index:
    """Chunks + vectors in a store, BM25 in memory; implements types.Retriever."""

    def __init__(self, store: VectorStore, embedder: Embedder | None = None, backend: str = "sqlite"):
        self.store, self.backend = store, backend
        settings = store.settings()
        self.chunk_config = ChunkConfig(**settings.get("chunk", {}))
        self.embedder_spec = settings.get("embedder_spec")
        if embedder is not None:
            self._check(embedder)
        self.embedder = embedder
        self._bm25_lock = threading.RLock()  # a server searches from several threads; BM25 rebuilds lazily
        self._bm25: BM25 | None = None
        self._bm25_ids: set[str] = set()
        self._bm25_gen = -1

    # --- construction ---
    @classmethod
    def build(cls, docs: Iterable[Document] | Any, embedder: Embedder | str, path: str | os.PathLike | None = None,
              chunk: ChunkConfig | None = None, backend: str = "sqlite", overwrite: bool = False,
              progress: bool = False, batch_docs: int = 256, **backend_options: Any) -> "Index":
        """Chunk, embed and store `docs`. `path` is a directory (sqlite, faiss), a DSN (pgvector) or None
        (in memory). An existing index at `path` is an error unless `overwrite`."""
        embedder, spec = _resolve_embedder(embedder)
        if embedder is None:
            raise LmstackError("Index.build needs an embedder (an Embedder, 'minilm' or an encoder directory)")
        chunk = chunk or ChunkConfig()
        docs = list(getattr(docs, "documents", docs))  # an ingest.IngestReport, or documents
        if backend == "pgvector" or path is None:
            store = _open_store(path, backend, embedder.name, embedder.dim, backend_options)
            if len(store) and not overwrite:
                raise LmstackError(f"{store.location} already holds an index; open it and add, or pass overwrite")
            store.delete(store.doc_ids())
            return cls._fill(store, embedder, spec, chunk, backend, docs, progress, batch_docs)
        final = Path(path)
        if final.exists() and not overwrite:
            raise LmstackError(f"{final} already exists; open the index and add to it, or pass overwrite=True")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.build-"))
        try:
            store = _open_store(tmp, backend, embedder.name, embedder.dim, backend_options)
            cls._fill(store, embedder, spec, chunk, backend, docs, progress, batch_docs).close()
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(final, embedder)

    @classmethod
    def _fill(cls, store: VectorStore, embedder: Embedder, spec: str | None, chunk: ChunkConfig, backend: str,
              docs: list[Document], progress: bool, batch_docs: int) -> "Index":
        store.set_settings({"chunk": chunk.to_dict(), "embedder_spec": spec, "backend": backend})
        index = cls(store, embedder, backend)
        bar = tqdm(total=len(docs), desc="index", unit="doc", disable=not progress)
        for i in range(0, len(docs), batch_docs):
            index.add(docs[i:i + batch_docs])
            bar.update(len(docs[i:i + batch_docs]))
        bar.close()
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, embedder: Embedder | str | None = None, **backend_options: Any
             ) -> "Index":
        """Open an index built by `build`. With `embedder`, refuse it unless its name and dim match the
        stored ones; without, the stored spec is loaded on the first dense query."""
        embedder, _ = _resolve_embedder(embedder)
        name, dim = (embedder.name, embedder.dim) if embedder is not None else (None, None)
        if _is_dsn(path):
            return cls(_open_store(path, "pgvector", name, dim, backend_options), embedder, "pgvector")
        if not (Path(path) / DB_NAME).is_file():
            raise LmstackError(f"{path} is not an index directory (no {DB_NAME}); build one with Index.build "
                               "or `lmstack rag index`")
        probe = SQLiteStore(Path(path) / DB_NAME, name=name, dim=dim)
        backend = probe.settings().get("backend", "sqlite")
        if backend == "sqlite":
            return cls(probe, embedder, backend)
        probe.close()
        return cls(_open_store(path, backend, name, dim, backend_options), embedder, backend)

    # --- properties ---
    @property
    def embedder_name(self) -> str:
        return self.store.name

    @property
    def dim(self) -> int:
        return self.store.dim

    def __len__(self) -> int:
        return len(self.store)

    def _check(self, embedder: Embedder) -> None:
        if embedder.name != self.store.name or embedder.dim != self.store.dim:
            raise LmstackError(f"index {self.store.location} was built with embedder {self.store.name!r} (dim "
                               f"{self.store.dim}), not {embedder.name!r} (dim {embedder.dim}); search it with the "
                               "same embedder or rebuild the index")

    def _embedder(self) -> Embedder:
        if self.embedder is None:
            spec = self.embedder_spec or ("minilm" if self.store.name == "minilm-l6-v2" else None)
            if spec is None:
                raise LmstackError(f"index {self.store.location} was built with embedder {self.store.name!r}, which "
                                   "cannot be loaded by name; pass embedder= to Index.open for dense search")
            embedder, _ = _resolve_embedder(spec)
            self._check(embedder)
            self.embedder = embedder
        return self.embedder

    # --- writes ---
    def _chunk_and_embed(self, docs: list[Document]) -> tuple[list[Chunk], np.ndarray]:
        ids = [d.doc_id for d in docs]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise LmstackError(f"duplicate document ids in one call: {twice[:5]}")
        chunks = [c for d in docs for c in self.chunk_config.chunk(d)]
        if not chunks:
            return [], np.zeros((0, self.dim), np.float32)
        vectors = self._embedder().embed([c.text for c in chunks])
        return chunks, vectors

    def add(self, docs: Iterable[Document]) -> int:
        """Chunk, embed and store new documents; returns the number of chunks added."""
        docs = list(docs)
        chunks, vectors = self._chunk_and_embed(docs)
        before = self.store.generation()
        self.store.add(docs, chunks, vectors)
        self._bm25_patch(before, [], chunks)
        return len(chunks)

    def update(self, doc: Document | Iterable[Document]) -> int:
        """Replace documents by id (their old chunks go, the new text is chunked and embedded)."""
        docs = [doc] if isinstance(doc, Document) else list(doc)
        chunks, vectors = self._chunk_and_embed(docs)
        old = self._chunk_ids_of([d.doc_id for d in docs])
        before = self.store.generation()
        self.store.update(docs, chunks, vectors)
        self._bm25_patch(before, old, chunks)
        return len(chunks)

    def delete(self, doc_id: str | Iterable[str]) -> int:
        """Remove documents by id; returns how many were there."""
        ids = [doc_id] if isinstance(doc_id, str) else list(doc_id)
        old = self._chunk_ids_of(ids)
        before = self.store.generation()
        found = self.store.delete(ids)
        self._bm25_patch(before, old, [])
        return found

    def _chunk_ids_of(self, doc_ids: list[str]) -> list[str]:
        if self._bm25 is None:
            return []  # nothing to patch: BM25 is built from the store when first needed
        wanted = set(doc_ids)
        return [i for i in self._bm25_ids if i.rsplit("#", 1)[0] in wanted]

    def _bm25_patch(self, before: int, removed: list[str], added: list[Chunk]) -> None:
        """Apply this process's write to BM25 when it was current; otherwise the next query rebuilds it."""
        with self._bm25_lock:
            if self._bm25 is None or self._bm25_gen != before:
                return
            self._bm25.remove(removed)
            self._bm25.add([c.chunk_id for c in added], [c.text for c in added])
            self._bm25_ids.difference_update(removed)
            self._bm25_ids.update(c.chunk_id for c in added)
            self._bm25_gen = self.store.generation()

    def _bm25_search(self, query: str, n: int) -> list[tuple[str, float]]:
        with self._bm25_lock:
            gen = self.store.generation()
            if self._bm25 is None or gen != self._bm25_gen:
                ids, texts = self.store.chunk_texts()
                self._bm25 = BM25()
                self._bm25.add(ids, texts)
                self._bm25_ids, self._bm25_gen = set(ids), gen
            return self._bm25.search(query, n)

    # --- reads ---
    def get(self, chunk_id: str) -> Chunk:
        return self.store.get([chunk_id])[0]

    def document(self, doc_id: str) -> Document:
        return self.store.document(doc_id)

    def doc_ids(self) -> list[str]:
        return self.store.doc_ids()

    def search(self, query: str, k: int = 5, mode: str = "hybrid", rerank: Any = None, fusion: str = "rrf",
               weights: tuple[float, float] = (0.5, 0.5), candidates: int | None = None) -> list[Hit]:
        """The k best chunks for `query`. Hybrid fuses the top `candidates` (default max(4k, 20)) of each
        retriever; `rerank` reorders the top `candidates` fused hits."""
        if mode not in SEARCH_MODES:
            raise LmstackError(f"search mode {mode!r} is not one of {', '.join(SEARCH_MODES)}")
        if fusion not in FUSIONS:
            raise LmstackError(f"fusion {fusion!r} is not one of {', '.join(FUSIONS)}")
        if not isinstance(query, str) or not query.strip():
            raise LmstackError("the query is empty")
        if not isinstance(k, int) or k < 1:
            raise LmstackError(f"k must be a positive integer, got {k!r}")
        n = max(candidates or max(4 * k, 20), k)
        sparse = self._bm25_search(query, n) if mode in ("bm25", "hybrid") else []
        dense = self.store.search(self._query_vector(query), n) if mode in ("dense", "hybrid") else []
        if mode == "bm25":
            ranked = sparse
        elif mode == "dense":
            ranked = dense
        elif fusion == "rrf":
            ranked = rrf([[i for i, _ in sparse], [i for i, _ in dense]])
        else:
            ranked = blend([dict(sparse), dict(dense)], list(weights))
        ranked = ranked[:n if rerank is not None else k]
        by_source = {"bm25": dict(sparse), "dense": dict(dense)}
        # a chunk another process deleted since this process's caches last looked is left out, not an error
        chunks = {c.chunk_id: c for c in self.store.get([i for i, _ in ranked], skip_missing=True)}
        ranked = [(i, s) for i, s in ranked if i in chunks]
        hits = [Hit(chunks[i], float(s), r, {name: float(m[i]) for name, m in by_source.items() if i in m})
                for r, (i, s) in enumerate(ranked, 1)]
        if rerank is not None:
            fn: Callable = rerank.rerank if hasattr(rerank, "rerank") else rerank
            hits = [Hit(h.chunk, h.score, r, h.scores) for r, h in enumerate(fn(query, hits, k)[:k], 1)]
        return hits

    def _query_vector(self, query: str) -> np.ndarray:
        embedder = self._embedder()
        embed = getattr(embedder, "embed_queries", None) or embedder.embed
        return np.asarray(embed([query]), dtype=np.float32)[0]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
