"""SimHash near-duplicate detection: 64-bit fingerprints compared by Hamming distance.

A document's fingerprint (Charikar 2002) sets bit j when more than half of its shingle hashes
(counted with repetition) have bit j set, so similar documents get fingerprints a few bits apart.
Finding all fingerprints within distance k uses the pigeonhole trick of Manku et al. (2007): cut
the 64 bits into k+1 blocks; two fingerprints within distance k agree exactly on at least one
block, so one hash table per block yields every candidate, confirmed by popcount(a ^ b) <= k.

Usage:
    from lmstack.data.dedup.simhash import SimHashConfig, SimHasher, SimHashIndex
    fps = SimHasher(SimHashConfig()).signatures(texts)   # (n,) uint64
    reps = SimHashIndex(SimHashConfig()).add(fps)         # earlier near-duplicate's index, or -1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmstack.data.dedup.shingles import batch_shingle_hashes


@dataclass
class SimHashConfig:
    """SimHash fingerprint and matching parameters."""

    ngram: int = 2
    """Shingle length (words or characters). Word bigrams: a bag of single words lets frequent words dominate
    the fingerprint, so unrelated texts of one style collide (precision 0.41 vs 1.0 in benchmarks/dedup.py)."""
    shingle: Literal["word", "char"] = "word"
    """Shingle unit."""
    max_distance: int = 8
    """Largest Hamming distance (of 64 bits) that counts as a near-duplicate. The index uses max_distance + 1
    blocks, so each lookup scans about (max_distance + 1) * n / 2^(64 / (max_distance + 1)) fingerprints."""

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"simhash.ngram={self.ngram} must be >= 1")
        if not 0 <= self.max_distance <= 15:
            raise ValueError(f"simhash.max_distance={self.max_distance} must be in [0, 15] (k+1 blocks of 64 bits)")


class SimHasher:
    """Computes 64-bit SimHash fingerprints for a batch of texts, vectorised over all shingles."""

    def __init__(self, cfg: SimHashConfig) -> None:
        self.cfg = cfg

    def signatures(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, dtype=np.uint64)
        x, counts = batch_shingle_hashes(texts, self.cfg.ngram, self.cfg.shingle)
        # (shingles, 64) bit matrix; bitorder='little' makes column j bit j of the little-endian word.
        bits = np.unpackbits(x.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        ones = np.add.reduceat(bits.astype(np.int32), starts, axis=0)
        majority = (2 * ones > counts[:, None]).astype(np.uint8)
        return np.packbits(majority, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class SimHashIndex:
    """Streaming index: `add` finds each fingerprint's earlier near-duplicate, then indexes it."""

    def __init__(self, cfg: SimHashConfig) -> None:
        self.cfg = cfg
        n_blocks = cfg.max_distance + 1
        edges = np.linspace(0, 64, n_blocks + 1).astype(int)
        self.blocks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.blocks]
        self.fps: list[int] = []
        self.rep: list[int] = []

    def __len__(self) -> int:
        return len(self.fps)

    def add(self, fps: np.ndarray, query: bool = True) -> np.ndarray:
        """Index `fps` in order; for each, its earlier near-duplicate's representative, or -1.

        query=False only indexes (reloading stored fingerprints).
        """
        out = np.full(len(fps), -1, dtype=np.int64)
        k = self.cfg.max_distance
        for i, fp in enumerate(fps.tolist()):
            keys = [(fp >> shift) & mask for shift, mask in self.blocks]
            best, best_d = -1, k + 1
            for table, key in zip(self.tables if query else (), keys):
                for j in table.get(key, ()):
                    d = hamming(fp, self.fps[j])
                    if d < best_d:
                        best, best_d = j, d
            idx = len(self.fps)
            self.fps.append(fp)
            self.rep.append(idx if best < 0 else self.rep[best])
            if best >= 0:
                out[i] = self.rep[best]
            for table, key in zip(self.tables, keys):
                table.setdefault(key, []).append(idx)
        return out

    def signatures(self) -> np.ndarray:
        return np.array(self.fps, dtype=np.uint64)
