"""The FAISS backend: the SQLite store keeps documents, chunks and the float32 vectors (the truth), and a FAISS
index built from those vectors answers the searches: HNSW (graph, no training, fast at any size) or IVF-PQ
(clustered and product-quantized: a fraction of the memory, for collections too large to hold as float32).

The FAISS index is derived data. It is written with `faiss.write_index` beside the SQLite file, under a name
that carries the store's generation (`vectors-<generation>.faiss`, written to a temporary name and renamed),
so a process opening the index loads the file only when it matches the store; after a write by anyone else it
rebuilds from the stored vectors instead, and never searches stale vectors. This process's additions go
straight into the FAISS index; a deletion rebuilds it at the next search (HNSW cannot remove; IVF-PQ keeps its
trained codebooks and only re-adds).

IVF-PQ needs training data: below `train_min` vectors (default 10,000, FAISS's rule of thumb of 39 points per
centroid for 256 PQ centroids) the store searches exactly with `IndexFlatIP` and says so in `.kind_in_use`.

Usage:
    idx = Index.build(docs, "minilm", path="idx", backend="faiss", kind="hnsw")    # or kind="ivfpq"
    idx = Index.open("idx")                          # the kind and its settings are stored
    idx.store.kind_in_use                            # "hnsw" | "ivfpq" | "flat (...)"
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import LmstackError
from lmstack.rag.store import SQLiteStore

KINDS = ("hnsw", "ivfpq")
DEFAULTS = {"kind": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 64, "nlist": 0, "pq_m": 0,
            "nbits": 8, "nprobe": 16, "train_min": 10_000}


def _faiss():
    try:
        # lazy: faiss-cpu is the optional `rag` extra; index.py imports this module whether or not it is installed
        import faiss
    except ImportError:
        raise LmstackError("the faiss backend needs faiss-cpu: pip install 'lmstack[rag]'") from None
    return faiss


class FaissStore(SQLiteStore):
    """SQLiteStore whose searches go through a FAISS HNSW or IVF-PQ index over the stored vectors."""

    def __init__(self, path: str | Path, name: str | None = None, dim: int | None = None,
                 lock_timeout: float = 60.0, **options):
        _faiss()  # fail first, naming the package, when faiss-cpu is missing
        self.faiss_index = None
        self._kind = ""
        self._faiss_gen = -1
        super().__init__(path, name=name, dim=dim, lock_timeout=lock_timeout)
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise LmstackError(f"unknown faiss option(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
        stored = self.settings().get("faiss")
        self.options = {**DEFAULTS, **(stored or {}), **options}
        if self.options["kind"] not in KINDS:
            raise LmstackError(f"faiss kind {self.options['kind']!r} is not one of {', '.join(KINDS)}")
        if stored != self.options:
            self.set_settings({"faiss": self.options})
        self.dir = None if str(path) == ":memory:" else Path(path).parent
        self._load_file()

    @property
    def kind_in_use(self) -> str:
        """What answers searches now: "hnsw", "ivfpq", or "flat (...)" with the reason."""
        self._ensure()
        return self._kind

    # --- the file beside the database ---
    def _file(self, gen: int) -> Path:
        return self.dir / f"vectors-{gen}.faiss"

    def _load_file(self) -> None:
        faiss = _faiss()
        if self.dir is None:
            return
        gen = self.generation()
        f = self._file(gen)
        if f.is_file():
            self._refresh()  # the id order comes from the store, the vectors' index from the file
            self.faiss_index = faiss.read_index(str(f))
            if self.faiss_index.ntotal != len(self._ids):
                self.faiss_index = None  # not the file we wrote for this generation: rebuild
                return
            self._kind = self._describe(self.faiss_index)
            self._faiss_gen = gen

    def save(self) -> Path | None:
        """Write the FAISS index for the current generation (atomically) and drop older ones."""
        faiss = _faiss()
        if self.dir is None:
            return None
        self._ensure()
        target = self._file(self._faiss_gen)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".vectors-", suffix=".tmp")
            os.close(fd)
            try:
                faiss.write_index(self.faiss_index, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        for old in self.dir.glob("vectors-*.faiss"):
            if old != target:
                old.unlink(missing_ok=True)
        return target

    # --- building ---
    def _new_index(self, n: int) -> Any:
        faiss = _faiss()
        o, d = self.options, self.dim
        if o["kind"] == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(o["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(o["ef_construction"])
            return index
        if n < int(o["train_min"]):
            return faiss.IndexFlatIP(d)
        nlist = int(o["nlist"]) or max(1, min(int(4 * math.sqrt(n)), n // 39))
        pq_m = int(o["pq_m"]) or next(m for m in (d // 8, d // 4, d // 2, d, 1) if m and d % m == 0)
        if d % pq_m:
            raise LmstackError(f"faiss pq_m={pq_m} must divide the dimension {d}")
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, int(o["nbits"]), faiss.METRIC_INNER_PRODUCT)

    def _describe(self, index: Any) -> str:
        faiss = _faiss()
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = int(self.options["ef_search"])
            return "hnsw"
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = int(self.options["nprobe"])
            return "ivfpq"
        return f"flat (exact: fewer than train_min={self.options['train_min']} vectors to train ivfpq)"

    def _rebuild(self) -> None:
        faiss = _faiss()
        matrix = self._matrix
        index = self.faiss_index
        reuse = isinstance(index, faiss.IndexIVF) and index.is_trained and \
            len(matrix) >= int(self.options["train_min"])
        if reuse:
            index.reset()  # keep the trained centroids and codebooks; only the vectors changed
        else:
            index = self._new_index(len(matrix))
            if not index.is_trained:
                index.train(matrix)
        if len(matrix):
            index.add(matrix)
        self._kind = self._describe(index)
        self.faiss_index = index

    def _ensure(self) -> None:
        self._refresh()
        if self.faiss_index is None or self._faiss_gen != self._cached_gen:
            self._rebuild()
            self._faiss_gen = self._cached_gen

    # --- hooks from SQLiteStore ---
    def _changed(self, removed: list[str], added: list[str], vectors: np.ndarray) -> None:
        faiss = _faiss()
        # _patch has just moved _cached_gen one step on: the FAISS index is current if it was one step behind
        current = self.faiss_index is not None and self._faiss_gen == self._cached_gen - 1 and not removed
        if current and added and isinstance(self.faiss_index, faiss.IndexFlat) and \
                len(self._ids) >= int(self.options["train_min"]):
            current = False  # enough vectors now to train the IVF-PQ index asked for
        if current:
            if added:
                self.faiss_index.add(vectors)
            self._faiss_gen = self._cached_gen
        # otherwise _faiss_gen lags and the next search rebuilds

    # --- search ---
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise LmstackError(f"query vector has dim {q.shape[1]}, the index holds dim {self.dim}")
        self._ensure()
        if not self._ids:
            return []
        scores, rows = self.faiss_index.search(q, min(k, len(self._ids)))
        return [(self._ids[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]

    def close(self) -> None:
        try:
            self.save()
        finally:
            super().close()
