"""Exact deduplication: a 64-bit hash of the normalised text (NFKC, lowercase, no punctuation,
collapsed whitespace), so copies that differ only in case, spacing or punctuation collapse too.

Usage:
    from lmstack.data.dedup.exact import exact_hashes, ExactIndex
    index = ExactIndex()
    reps = index.add(exact_hashes(["Hello, world!", "hello world"]))   # [-1, 0]
"""
from __future__ import annotations

import numpy as np

from lmstack.data.dedup.shingles import hash64, normalize


def exact_hashes(texts: list[str]) -> np.ndarray:
    """uint64 hash of each text's normalised form."""
    return np.array([hash64(normalize(t)) for t in texts], dtype=np.uint64)


class ExactIndex:
    """Maps a normalised-text hash to the first document that had it."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.hashes: list[int] = []

    def __len__(self) -> int:
        return len(self.hashes)

    def add(self, hashes: np.ndarray, query: bool = True) -> np.ndarray:
        """Index `hashes` in order; for each, the index of the earlier identical document, or -1.

        (`query` exists for a uniform interface; a dict insert is its own lookup.)
        """
        out = np.full(len(hashes), -1, dtype=np.int64)
        for i, h in enumerate(hashes.tolist()):
            idx = len(self.hashes)
            self.hashes.append(h)
            first = self.first.setdefault(h, idx)
            if first != idx:
                out[i] = first
        return out

    def signatures(self) -> np.ndarray:
        return np.array(self.hashes, dtype=np.uint64)
