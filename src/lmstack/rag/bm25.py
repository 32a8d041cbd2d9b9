"""Okapi BM25 over an incrementally updated collection, scored from a sparse term x document matrix.

    score(q, d) = sum over query tokens t of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

That is Robertson's Okapi weighting as Lucene computes it: the idf stays positive for terms in more than half
the documents (the textbook idf goes negative there and would punish a document for containing a query word),
and the constant (k1 + 1) numerator is dropped, which rescales every score alike and changes no ranking.
`bm25s`' default method ("lucene") scores the same way; tests/rag/test_bm25.py checks our scores against it.
A query token that repeats counts once per repetition, as in bm25s.

Speed: the per-(term, document) BM25 weights are precomputed into a CSR matrix (rows: terms), so a query is
a gather of a few rows plus one `np.bincount`: the same eager-scoring idea as bm25s. N, avgdl and df change
when documents come or go, so `add` / `remove` only record the change and the matrix is rebuilt (vectorised,
O(postings)) at the next query. Removed documents leave a dead slot, compacted away once they outnumber the
live ones. benchmarks/rag_retrieval.py times queries against bm25s.

Usage:
    from lmstack.rag.bm25 import BM25, tokenize
    bm = BM25(k1=1.5, b=0.75)
    bm.add(["a", "b"], ["Ada Ashford was born in Amberhaven.", "Bo Baker works for Brightline."])
    bm.search("where was Ada born", k=5)     # [("a", 0.55...)]
    bm.scores("Brightline")                  # {"b": 0.28...}; documents without a query term are absent
    bm.remove(["a"])
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import regex
from scipy import sparse

from lmstack.errors import LmstackError

TOKEN_RE = regex.compile(r"\w+")
# Function words that carry no topic: dropping them saves postings and stops "what/was/the" from deciding a
# ranking. Short on purpose; every content word stays.
STOPWORDS = frozenset("""
a an and are as at be been being but by did do does for from had has have he her hers him his i if in into is it
its me my of on or our s she so than that the their them then there these they this those to was we were what
when where which who whom whose why will with you your
""".split())


def tokenize(text: str, stopwords: frozenset[str] | None = STOPWORDS) -> list[str]:
    """Lower-cased word tokens (unicode letters, digits and underscore), stop words dropped."""
    words = TOKEN_RE.findall(text.lower())
    return words if not stopwords else [w for w in words if w not in stopwords]


class BM25:
    """Okapi BM25 with k1 (term-frequency saturation) and b (length normalisation); see the module docstring."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: frozenset[str] | None = STOPWORDS):
        if not k1 >= 0:
            raise LmstackError(f"BM25 k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise LmstackError(f"BM25 b must be in [0, 1], got {b}")
        self.k1, self.b, self.stopwords = float(k1), float(b), stopwords
        self._vocab: dict[str, int] = {}
        self._ids: list[str | None] = []          # slot -> id; None once removed
        self._slot: dict[str, int] = {}
        self._terms: list[np.ndarray] = []        # slot -> term ids (unique)
        self._tfs: list[np.ndarray] = []          # slot -> their counts
        self._lens: list[int] = []
        self._matrix: sparse.csr_matrix | None = None

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._slot

    def add(self, ids: Iterable[str], texts: Iterable[str]) -> None:
        """Index `texts` under `ids`; an id already present is an error (remove it first to replace it)."""
        ids, texts = list(ids), list(texts)
        if len(ids) != len(texts):
            raise LmstackError(f"BM25.add got {len(ids)} ids for {len(texts)} texts")
        seen = set()
        for doc_id in ids:
            if doc_id in self._slot or doc_id in seen:
                raise LmstackError(f"BM25 already holds a document with id {doc_id!r}; remove it before adding "
                                   "it again")
            seen.add(doc_id)
        for doc_id, text in zip(ids, texts):
            words = tokenize(text, self.stopwords)
            term_ids = np.fromiter((self._vocab.setdefault(w, len(self._vocab)) for w in words), dtype=np.int64,
                                   count=len(words))
            uniq, counts = np.unique(term_ids, return_counts=True)
            self._slot[doc_id] = len(self._ids)
            self._ids.append(doc_id)
            self._terms.append(uniq.astype(np.int32))
            self._tfs.append(counts.astype(np.float32))
            self._lens.append(len(words))
        self._matrix = None

    def remove(self, ids: Iterable[str]) -> int:
        """Drop the documents with these ids; ids not held are ignored. Returns how many were removed."""
        n = 0
        for doc_id in ids:
            slot = self._slot.pop(doc_id, None)
            if slot is None:
                continue
            self._ids[slot] = None
            self._terms[slot] = np.zeros(0, np.int32)
            self._tfs[slot] = np.zeros(0, np.float32)
            self._lens[slot] = 0
            n += 1
        if n:
            self._matrix = None
        return n

    def _compact(self) -> None:
        live = [i for i, d in enumerate(self._ids) if d is not None]
        self._ids = [self._ids[i] for i in live]
        self._terms = [self._terms[i] for i in live]
        self._tfs = [self._tfs[i] for i in live]
        self._lens = [self._lens[i] for i in live]
        self._slot = {d: i for i, d in enumerate(self._ids)}

    def _build(self) -> sparse.csr_matrix:
        if len(self._ids) > 2 * len(self._slot) + 64:
            self._compact()
        n_docs, n_slots = len(self._slot), len(self._ids)
        lens = np.asarray(self._lens, dtype=np.float32)
        avgdl = float(lens.sum()) / n_docs if n_docs else 1.0
        sizes = np.fromiter((len(t) for t in self._terms), dtype=np.int64, count=n_slots)
        rows = np.concatenate(self._terms) if n_slots else np.zeros(0, np.int32)
        tf = np.concatenate(self._tfs) if n_slots else np.zeros(0, np.float32)
        cols = np.repeat(np.arange(n_slots, dtype=np.int32), sizes)
        df = np.bincount(rows, minlength=len(self._vocab)).astype(np.float64)
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
        norm = self.k1 * (1 - self.b + self.b * lens / max(avgdl, 1e-9))
        weights = idf[rows] * tf / (tf + norm[cols])
        self._matrix = sparse.csr_matrix((weights, (rows, cols)), shape=(len(self._vocab), n_slots))
        return self._matrix

    def _score_array(self, query: str) -> np.ndarray:
        m = self._matrix if self._matrix is not None else self._build()
        term_ids = [self._vocab[w] for w in tokenize(query, self.stopwords) if w in self._vocab]
        if not term_ids:
            return np.zeros(m.shape[1], dtype=np.float32)
        ptr = m.indptr
        cols = np.concatenate([m.indices[ptr[t]:ptr[t + 1]] for t in term_ids])
        vals = np.concatenate([m.data[ptr[t]:ptr[t + 1]] for t in term_ids])
        return np.bincount(cols, weights=vals, minlength=m.shape[1]).astype(np.float32)

    def scores(self, query: str) -> dict[str, float]:
        """{id: score} for every document holding at least one query token (absent ones score 0)."""
        s = self._score_array(query)
        hit = np.flatnonzero(s > 0)
        return {self._ids[i]: float(s[i]) for i in hit}

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The top-k (id, score), best first; only documents that share a token with the query."""
        if k < 1:
            raise LmstackError(f"k must be >= 1, got {k}")
        s = self._score_array(query)
        hit = np.flatnonzero(s > 0)
        if len(hit) > k:
            hit = hit[np.argpartition(-s[hit], k - 1)[:k]]
        hit = hit[np.lexsort((hit, -s[hit]))]  # best first; ties by insertion order, so results are stable
        return [(self._ids[i], float(s[i])) for i in hit]
