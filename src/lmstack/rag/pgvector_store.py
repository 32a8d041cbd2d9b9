"""The Postgres + pgvector backend: documents, chunks and `vector(dim)` embeddings in Postgres, searched there by
inner product (`<#>`), through an HNSW index (`vector_ip_ops`) or exactly. For collections that outgrow one
process, and for several servers sharing one index: Postgres does the locking, every process sees every write.

Point it at any Postgres that has the pgvector extension (`CREATE EXTENSION vector` must succeed for the user,
or the extension must already exist in the database) with a libpq DSN:

    postgresql://USER:PASSWORD@HOST:5432/DBNAME          # a server
    postgresql://postgres:@/postgres?host=/tmp/pgdata     # a local socket (what pgserver gives)

`pgserver` (PyPI) bundles a Postgres with pgvector, handy where the OS has no pgvector package:
`pgserver.get_server("/tmp/pgdata").get_uri()` starts one and returns its DSN. Tables are named
`<namespace>_meta`, `<namespace>_documents`, `<namespace>_chunks` (namespace "lmstack_rag" by default), so
several indexes can share one database.

Usage:
    idx = Index.build(docs, "minilm", path="postgresql://me@db/rag", backend="pgvector")
    idx = Index.open("postgresql://me@db/rag")
    store = PgVectorStore(dsn, name="minilm-l6-v2", dim=384, namespace="wiki", ann="exact")
"""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import numpy as np

from lmstack.errors import LmstackError
from lmstack.rag.store import VectorStore, check_embedder, check_vectors
from lmstack.rag.types import Chunk, Document

ANN = ("hnsw", "exact")
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,40}")


def _vec(v: np.ndarray) -> str:
    """pgvector's text form; repr of a float32 round-trips exactly."""
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


def _psycopg():
    try:
        # lazy: psycopg is the optional `rag` extra; index.py imports this module whether or not it is installed
        import psycopg
    except ImportError:
        raise LmstackError("the pgvector backend needs psycopg: pip install 'lmstack[rag]'") from None
    return psycopg


class PgVectorStore(VectorStore):
    """The VectorStore interface over Postgres + pgvector."""

    def __init__(self, dsn: str, name: str | None = None, dim: int | None = None, namespace: str = "lmstack_rag",
                 ann: str = "hnsw", ef_search: int = 64):
        if not _IDENT.fullmatch(namespace):
            raise LmstackError(f"pgvector namespace {namespace!r} must match {_IDENT.pattern}")
        if ann not in ANN:
            raise LmstackError(f"pgvector ann {ann!r} is not one of {', '.join(ANN)}")
        self.location = re.sub(r"://([^:@/]*):[^@]*@", r"://\1:***@", dsn) + f" [{namespace}]"  # no password
        self.ns, self.ann, self.ef_search = namespace, ann, ef_search
        self._lock = threading.RLock()
        psycopg = self._pg = _psycopg()
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise LmstackError(f"cannot connect to Postgres at {self.location}: {e}".strip()) from None
        t = self._t
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (namespace,))  # one creator at a time
            try:
                c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as e:
                raise LmstackError(f"pgvector is not available in {self.location}: {e}".strip()) from None
            c.execute(f"CREATE TABLE IF NOT EXISTS {t('meta')} (key text PRIMARY KEY, value text NOT NULL)")
            meta = dict(c.execute(f"SELECT key, value FROM {t('meta')}").fetchall())
            if "name" not in meta:
                if name is None or dim is None:
                    raise LmstackError(f"{self.location} holds no index (no embedder recorded); build one first")
                c.cursor().executemany(f"INSERT INTO {t('meta')} VALUES (%s, %s)", [
                    ("name", name), ("dim", str(int(dim))), ("generation", "0"), ("settings", "{}")])
                meta = {"name": name, "dim": str(int(dim))}
            self.name, self.dim = meta["name"], int(meta["dim"])
            c.execute(f"CREATE TABLE IF NOT EXISTS {t('documents')} (doc_id text PRIMARY KEY, source text NOT NULL, "
                      "text text NOT NULL, metadata jsonb NOT NULL)")
            c.execute(f"CREATE TABLE IF NOT EXISTS {t('chunks')} (row bigserial PRIMARY KEY, chunk_id text NOT NULL "
                      f"UNIQUE, doc_id text NOT NULL REFERENCES {t('documents')} ON DELETE CASCADE, text text NOT "
                      'NULL, source text NOT NULL, start integer NOT NULL, "end" integer NOT NULL, heading_path '
                      f"jsonb NOT NULL, metadata jsonb NOT NULL, embedding vector({self.dim}) NOT NULL)")
            c.execute(f"CREATE INDEX IF NOT EXISTS {self.ns}_chunks_doc ON {t('chunks')} (doc_id)")
            if ann == "hnsw":
                c.execute(f"CREATE INDEX IF NOT EXISTS {self.ns}_chunks_hnsw ON {t('chunks')} "
                          "USING hnsw (embedding vector_ip_ops)")
        check_embedder(f"index {self.location}", self.name, self.dim, name, dim)

    def _t(self, table: str) -> str:
        return f"{self.ns}_{table}"

    @contextmanager
    def _tx(self):
        """A transaction on the shared connection, serialised across this process's threads."""
        with self._lock, self.conn.transaction():
            yield self.conn

    def _write(self, body: Callable[[Any], Any]) -> Any:
        with self._tx() as c:
            out = body(c)
            c.execute(f"UPDATE {self._t('meta')} SET value = (value::bigint + 1)::text WHERE key = 'generation'")
        return out

    def generation(self) -> int:
        with self._lock:
            row = self.conn.execute(f"SELECT value FROM {self._t('meta')} WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def settings(self) -> dict:
        with self._lock:
            row = self.conn.execute(f"SELECT value FROM {self._t('meta')} WHERE key = 'settings'").fetchone()
        return json.loads(row[0]) if row else {}

    def set_settings(self, values: dict) -> None:
        merged = json.dumps({**self.settings(), **values})
        self._write(lambda c: c.execute(f"UPDATE {self._t('meta')} SET value = %s WHERE key = 'settings'", (merged,)))

    # --- writes ---
    def add(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None:
        self._put(docs, chunks, vectors, replace=False)

    def update(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray) -> None:
        self._put(docs, chunks, vectors, replace=True)

    def _put(self, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray, replace: bool) -> None:
        vectors = check_vectors(chunks, vectors, self.dim)
        t = self._t

        def body(c):
            ids = [d.doc_id for d in docs]
            if replace:
                c.execute(f"DELETE FROM {t('documents')} WHERE doc_id = ANY(%s)", (ids,))
            else:
                have = [r[0] for r in c.execute(f"SELECT doc_id FROM {t('documents')} WHERE doc_id = ANY(%s)",
                                                (ids,))]
                if have:
                    raise LmstackError(f"documents already in the index: {have[:5]}; use update to replace them")
            with c.cursor() as cur:
                cur.executemany(f"INSERT INTO {t('documents')} VALUES (%s, %s, %s, %s)",
                                [(d.doc_id, d.source, d.text, json.dumps(d.metadata)) for d in docs])
                cur.executemany(f'INSERT INTO {t("chunks")} (chunk_id, doc_id, text, source, start, "end", '
                                "heading_path, metadata, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                                "%s::vector)",
                                [(ch.chunk_id, ch.doc_id, ch.text, ch.source, ch.start, ch.end,
                                  json.dumps(list(ch.heading_path)), json.dumps(ch.metadata), _vec(v))
                                 for ch, v in zip(chunks, vectors)])
        try:
            self._write(body)
        except self._pg.errors.UniqueViolation as e:
            raise LmstackError(f"index {self.location}: {e.diag.message_detail or e} (ids must be unique)") from None

    def delete(self, doc_ids: Iterable[str]) -> int:
        ids = list(doc_ids)
        return self._write(lambda c: c.execute(f"DELETE FROM {self._t('documents')} WHERE doc_id = ANY(%s)",
                                               (ids,)).rowcount)

    # --- reads ---
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise LmstackError(f"query vector has dim {q.shape[0]}, the index holds dim {self.dim}")
        with self._tx() as c:
            if self.ann == "hnsw":
                c.execute(f"SET LOCAL hnsw.ef_search = {max(int(self.ef_search), int(k))}")
            else:
                c.execute("SET LOCAL enable_indexscan = off")  # exact: a sequential scan and a sort
            rows = c.execute(f"SELECT chunk_id, -(embedding <#> %s::vector) FROM {self._t('chunks')} "
                             "ORDER BY embedding <#> %s::vector LIMIT %s", (_vec(q), _vec(q), int(k))).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def get(self, chunk_ids: list[str], skip_missing: bool = False) -> list[Chunk]:
        with self._lock:
            rows = self.conn.execute(f'SELECT chunk_id, doc_id, text, source, start, "end", heading_path, metadata '
                                     f"FROM {self._t('chunks')} WHERE chunk_id = ANY(%s)", (list(chunk_ids),))
            found = {r[0]: Chunk(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6]), r[7]) for r in rows}
        missing = [i for i in chunk_ids if i not in found]
        if missing and not skip_missing:
            raise LmstackError(f"no chunk {missing[0]!r} in index {self.location}")
        return [found[i] for i in chunk_ids if i in found]

    def document(self, doc_id: str) -> Document:
        with self._lock:
            row = self.conn.execute(f"SELECT source, text, metadata FROM {self._t('documents')} WHERE doc_id = %s",
                                    (doc_id,)).fetchone()
        if row is None:
            raise LmstackError(f"no document {doc_id!r} in index {self.location}")
        return Document(doc_id, row[1], row[0], row[2])

    def doc_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute(f"SELECT doc_id FROM {self._t('documents')} ORDER BY doc_id")]

    def chunk_texts(self) -> tuple[list[str], list[str]]:
        with self._lock:
            rows = self.conn.execute(f"SELECT chunk_id, text FROM {self._t('chunks')} ORDER BY row").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute(f"SELECT COUNT(*) FROM {self._t('chunks')}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.conn.close()
