"""The default vector store: one SQLite file holding documents, chunks (text, offsets, heading path and metadata
as JSON) and float32 embedding blobs, searched exactly with numpy.

- **Exact search.** The embeddings live in memory as one (N, dim) matrix, loaded on first use and kept in step
  with the file: every write bumps a `generation` counter in the file, and a search whose cached generation is
  behind (another process wrote) reloads. This process's own writes patch the matrix in place.
- **Incremental.** `add` inserts new documents, `update` replaces a document's chunks, `delete` removes them,
  each by document id, each one transaction: a reader never sees half a document.
- **Concurrent writers.** WAL mode (readers never block the writer) and a busy timeout; a write that still
  finds the database locked is retried with backoff for up to `lock_timeout` seconds, so two processes writing
  at once both succeed and the file stays consistent.
- **Embedder check.** The embedder's name and dimension are stored at creation; opening with another name or
  dimension raises `LmstackError` naming both.

`VectorStore` is the interface the Index uses; `faiss_store.FaissStore` and `pgvector_store.PgVectorStore` are
the other two implementations.

Usage:
    from lmstack.rag.store import SQLiteStore
    store = SQLiteStore("idx/index.db", name="minilm-l6-v2", dim=384)
    store.add(docs, chunks, vectors)            # vectors: (len(chunks), 384) float32, L2-normalised
    store.search(query_vector, k=5)             # [(chunk_id, cosine), ...]
    store.get("bio-17#0"); store.delete(["bio-17"]); store.update([doc], chunks, vectors)
"""
from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lmstack.errors import LmstackError
from lmstack.rag.types import Chunk, Document

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, text TEXT NOT NULL,
    metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (row INTEGER PRIMARY KEY AUTOINCREMENT, chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id), text TEXT NOT NULL, source TEXT NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, heading_path TEXT NOT NULL, metadata TEXT NOT NULL,
    embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
"""


def check_embedder(where: str, stored_name: str, stored_dim: int, name: str | None, dim: int | None) -> None:
    """Refuse an embedder other than the one an index was built with (every backend calls this)."""
    if (name is not None and name != stored_name) or (dim is not None and int(dim) != stored_dim):
        raise LmstackError(f"{where} was built with embedder {stored_name!r} (dim {stored_dim}), not "
                           f"{name!r} (dim {dim}); search it with the same embedder or rebuild the index")


def check_vectors(chunks: list[Chunk], vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(chunks), dim):
        raise LmstackError(f"expected {len(chunks)} vectors of dim {dim}, got an array of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise LmstackError("embedding vectors contain NaN or inf")
    return vectors


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (argpartition, then a sort of only those k)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.argsort(-scores[part], kind="stable")]


class VectorStore:
    """What the Index needs from a backend. `name`/`dim` are the embedder's; `settings` is free JSON the Index
    keeps beside (chunk config, embedder spec)."""
    name: str
    dim: int
    location: str

    def add(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def update(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete(self, doc_ids: Iterable[str]) -> int: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def get(self, chunk_ids: list[str], skip_missing: bool = False) -> list[Chunk]: ...
    def document(self, doc_id: str) -> Document: ...
    def doc_ids(self) -> list[str]: ...
    def chunk_texts(self) -> tuple[list[str], list[str]]: ...
    def settings(self) -> dict: ...
    def set_settings(self, values: dict) -> None: ...
    def generation(self) -> int: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


def _row_chunk(row: tuple) -> Chunk:
    chunk_id, doc_id, text, source, start, end, heading, meta = row
    return Chunk(chunk_id, doc_id, text, source, start, end, tuple(json.loads(heading)), json.loads(meta))


class SQLiteStore(VectorStore):
    """Chunks, metadata and float32 vectors in one SQLite file; exact inner-product search with numpy."""

    def __init__(self, path: str | Path, name: str | None = None, dim: int | None = None,
                 lock_timeout: float = 60.0):
        self.path = Path(path)
        self.location = str(self.path)
        self.lock_timeout = lock_timeout
        self._lock = threading.RLock()  # one connection, shared by a server's threads
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout = 5000")
            if str(path) != ":memory:":
                self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
            self._retry(lambda: self.conn.executescript(_SCHEMA))
        except sqlite3.DatabaseError as e:
            raise LmstackError(f"{path} is not a usable SQLite index: {e}") from None
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if "name" not in meta:
            if name is None or dim is None:
                raise LmstackError(f"{path} is not an index (no embedder recorded); build one first")
            self._write(lambda c: c.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", [
                ("name", name), ("dim", str(int(dim))), ("schema", str(SCHEMA_VERSION)), ("generation", "0"),
                ("settings", "{}")]))
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("schema", 0)) != SCHEMA_VERSION:
            raise LmstackError(f"{path} has index schema {meta.get('schema')}, this lmstack reads {SCHEMA_VERSION}")
        self.name, self.dim = meta["name"], int(meta["dim"])
        check_embedder(f"index {path}", self.name, self.dim, name, dim)
        self._ids: list[str] = []
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._cached_gen = -1

    # --- transactions ---
    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run fn, retrying with jittered backoff while the database is locked by another process."""
        deadline, wait = time.monotonic() + self.lock_timeout, 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise LmstackError(f"index {self.path} stayed locked for {self.lock_timeout:.0f} s by another "
                                       "writer; try again") from None
                time.sleep(wait * (1 + random.random()))
                wait = min(wait * 2, 0.5)

    def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front), retried while locked; bumps
        the generation so other processes' caches see the change."""
        def attempt():
            with self._lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    out = body(self.conn)
                    self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
                    gen = self.generation()
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                return out, gen
        return self._retry(attempt)

    def generation(self) -> int:
        with self._lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def settings(self) -> dict:
        with self._lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return json.loads(row[0]) if row else {}

    def set_settings(self, values: dict) -> None:
        merged = {**self.settings(), **values}
        _, gen = self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)",
                                                 (json.dumps(merged),)))
        self._patch(gen, [], [], np.zeros((0, self.dim), np.float32))

    # --- writes ---
    def add(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Insert new documents and their chunks; a document id already stored is an error (use update)."""
        self._put(docs, chunks, vectors, replace=False)

    def update(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Replace each document (and all its chunks) by the new version; a new id is simply added."""
        self._put(docs, chunks, vectors, replace=True)

    def _put(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray, replace: bool) -> None:
        vectors = check_vectors(chunks, vectors, self.dim)
        ids = {d.doc_id for d in docs}
        stray = sorted({c.doc_id for c in chunks} - ids)
        if stray:
            raise LmstackError(f"chunks of documents not being written: {stray[:5]}")

        def body(c: sqlite3.Connection):
            removed = self._delete_rows(c, ids) if replace else []
            if not replace:
                have = [d.doc_id for d in docs if c.execute("SELECT 1 FROM documents WHERE doc_id = ?",
                                                            (d.doc_id,)).fetchone()]
                if have:
                    raise LmstackError(f"documents already in the index: {have[:5]}; use update to replace them")
            c.executemany("INSERT INTO documents VALUES (?, ?, ?, ?)",
                          [(d.doc_id, d.source, d.text, json.dumps(d.metadata)) for d in docs])
            c.executemany('INSERT INTO chunks (chunk_id, doc_id, text, source, start, "end", heading_path, '
                          'metadata, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
                          [(ch.chunk_id, ch.doc_id, ch.text, ch.source, ch.start, ch.end,
                            json.dumps(list(ch.heading_path)), json.dumps(ch.metadata), v.tobytes())
                           for ch, v in zip(chunks, vectors)])
            return removed
        try:
            removed, gen = self._write(body)
        except sqlite3.IntegrityError as e:
            raise LmstackError(f"index {self.path}: {e} (chunk ids must be unique)") from None
        self._patch(gen, removed, [c.chunk_id for c in chunks], vectors)

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents and their chunks; returns how many documents were there."""
        ids = set(doc_ids)

        def body(c: sqlite3.Connection):
            found = sum(1 for i in ids if c.execute("SELECT 1 FROM documents WHERE doc_id = ?", (i,)).fetchone())
            return found, self._delete_rows(c, ids)
        (found, removed), gen = self._write(body)
        self._patch(gen, removed, [], np.zeros((0, self.dim), np.float32))
        return found

    @staticmethod
    def _delete_rows(c: sqlite3.Connection, doc_ids: set[str]) -> list[str]:
        removed = []
        for doc_id in doc_ids:
            removed += [r[0] for r in c.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (doc_id,))]
            c.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            c.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return removed

    # --- the in-memory matrix ---
    def _patch(self, gen: int, removed: list[str], added: list[str], vectors: np.ndarray) -> None:
        """Apply this process's own write to the cached matrix, when the cache was current just before it."""
        with self._lock:
            if self._cached_gen != gen - 1:
                return  # the cache missed another writer's change: the next search reloads
            if removed:
                gone = set(removed)
                keep = np.array([i not in gone for i in self._ids], dtype=bool)
                self._matrix = self._matrix[keep]
                self._ids = [i for i in self._ids if i not in gone]
            if added:
                self._matrix = np.concatenate([self._matrix, vectors]) if len(self._ids) else vectors.copy()
                self._ids += added
            self._cached_gen = gen
            self._changed(removed, added, vectors)

    def _changed(self, removed: list[str], added: list[str], vectors: np.ndarray) -> None:
        """Hook for derived indexes (FAISS) kept in step with the matrix."""

    def _refresh(self) -> None:
        gen = self.generation()
        with self._lock:
            if gen == self._cached_gen:
                return
            rows = self.conn.execute("SELECT chunk_id, embedding FROM chunks ORDER BY row").fetchall()
            self._ids = [r[0] for r in rows]
            blob = b"".join(r[1] for r in rows)
            self._matrix = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), self.dim).copy()
            self._cached_gen = gen
            self._reloaded()

    def _reloaded(self) -> None:
        """Hook: the matrix was reloaded from the file."""

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(chunk ids, their vectors), current with the file."""
        self._refresh()
        return self._ids, self._matrix

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k chunks of largest inner product (cosine, for unit vectors) with `vector`, exactly."""
        ids, matrix = self.matrix()
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise LmstackError(f"query vector has dim {q.shape[0]}, the index holds dim {self.dim}")
        # einsum's single-threaded SIMD loop, not BLAS: one query is a memory-bound GEMV that one core nearly
        # saturates, and BLAS's thread pool costs more than it gives on small collections or a busy machine
        # (5000 x 384 with 2 busy cores: 21 ms threaded, 0.8 ms here)
        scores = np.einsum("ij,j->i", matrix, q)
        return [(ids[i], float(scores[i])) for i in top_k(scores, k)]

    # --- reads ---
    def get(self, chunk_ids: list[str], skip_missing: bool = False) -> list[Chunk]:
        """Chunks by id, in the order asked; an unknown id raises, or is left out with skip_missing."""
        with self._lock:
            found = {}
            for i in range(0, len(chunk_ids), 500):
                part = chunk_ids[i:i + 500]
                q = ('SELECT chunk_id, doc_id, text, source, start, "end", heading_path, metadata FROM chunks '
                     f"WHERE chunk_id IN ({','.join('?' * len(part))})")
                found.update((r[0], _row_chunk(r)) for r in self.conn.execute(q, part))
        missing = [i for i in chunk_ids if i not in found]
        if missing and not skip_missing:
            raise LmstackError(f"no chunk {missing[0]!r} in index {self.location}")
        return [found[i] for i in chunk_ids if i in found]

    def document(self, doc_id: str) -> Document:
        with self._lock:
            row = self.conn.execute("SELECT source, text, metadata FROM documents WHERE doc_id = ?",
                                    (doc_id,)).fetchone()
        if row is None:
            raise LmstackError(f"no document {doc_id!r} in index {self.location}")
        return Document(doc_id, row[1], row[0], json.loads(row[2]))

    def doc_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT doc_id FROM documents ORDER BY doc_id")]

    def chunk_texts(self) -> tuple[list[str], list[str]]:
        with self._lock:
            rows = self.conn.execute("SELECT chunk_id, text FROM chunks ORDER BY row").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def integrity(self) -> str:
        with self._lock:
            return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.conn.close()
