"""MinHash-LSH near-duplicate detection, vectorised with numpy.

Signatures: each document's shingles are hashed to x < 2^31 and pushed through `num_perm`
universal hash functions h_i(x) = (a_i * x + b_i) mod p with the Mersenne prime p = 2^31 - 1.
With a, b, x < 2^31 the product fits in uint64 exactly, and "mod p" is two shift-and-add folds
instead of a division. The min over a document's shingles of h_i is signature entry i;
P(two documents agree at i) = their Jaccard similarity. We compute a whole batch at once: all
shingles of all documents in one array, processed in cache-sized blocks of rows against every
permutation, with `np.minimum.reduceat` taking each document's minimum.

LSH: the signature is cut into `bands` bands of `rows` rows; two documents become candidates when
any band matches exactly, which happens with probability 1 - (1 - J^rows)^bands (an S-curve with
its threshold near (1/bands)^(1/rows)). Candidates are confirmed by the signature agreement
(estimated Jaccard) >= `threshold`.

Usage:
    from lmstack.data.dedup.minhash import MinHashConfig, MinHasher, MinHashLSH
    hasher = MinHasher(MinHashConfig())
    sigs = hasher.signatures(texts)                     # (n, num_perm) uint32
    lsh = MinHashLSH(MinHashConfig())
    reps = lsh.add(sigs, ids)                           # reps[i] = index of the earlier doc i duplicates, or -1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmstack.data.dedup.shingles import batch_shingle_hashes, shingle_hashes, splitmix64

MERSENNE31 = np.uint64((1 << 31) - 1)
_S31 = np.uint64(31)
BLOCK_ROWS = 512  # shingles per block: a (128, 512) uint64 block is 512 KiB and stays in cache


@dataclass
class MinHashConfig:
    """MinHash signature and LSH banding parameters."""

    num_perm: int = 128
    """Hash functions per signature."""
    bands: int = 25
    """LSH bands; more bands -> lower similarity threshold, more candidates."""
    rows: int = 5
    """Rows per band; bands * rows must be <= num_perm. 25 x 5 finds a pair at J=0.7 with p=0.99."""
    ngram: int = 5
    """Shingle length (words or characters)."""
    shingle: Literal["word", "char"] = "word"
    """Shingle unit."""
    threshold: float = 0.7
    """Confirm a candidate pair when the estimated Jaccard is at least this; 0 accepts every LSH candidate."""
    seed: int = 1
    """Seed of the hash functions (signatures from different seeds are not comparable)."""

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.bands < 1 or self.rows < 1 or self.ngram < 1:
            raise ValueError("minhash.num_perm, bands, rows and ngram must all be >= 1")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"minhash.bands * minhash.rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"minhash.threshold={self.threshold} must be in [0, 1]")


def _mod_mersenne31(y: np.ndarray, tmp: np.ndarray) -> None:
    """y <- y mod (2^31 - 1) in place, for y < 2^62.

    One fold, s = (y & p) + (y >> 31), gives a value in [0, 2p] congruent to y (2^31 = 1 mod p);
    then min(s, s - p) subtracts p exactly when s >= p (for s < p the unsigned s - p wraps to a
    huge number and min keeps s). Exact, except that s = 2p comes out as p instead of 0.
    """
    np.right_shift(y, _S31, out=tmp)
    y &= MERSENNE31
    y += tmp
    np.subtract(y, MERSENNE31, out=tmp)
    np.minimum(y, tmp, out=y)


class MinHasher:
    """Computes MinHash signatures; the hash functions are fixed by the config's seed."""

    def __init__(self, cfg: MinHashConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.a = rng.integers(1, int(MERSENNE31), cfg.num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(MERSENNE31), cfg.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The document's shingle hashes reduced to x < 2^31 (the domain of the permutations)."""
        return shingle_hashes(text, self.cfg.ngram, self.cfg.shingle) >> np.uint64(33)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures."""
        x, counts = batch_shingle_hashes(texts, self.cfg.ngram, self.cfg.shingle)
        return self.signatures_from_shingles(x >> np.uint64(33), counts)

    def signatures_from_shingles(self, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures from all documents' shingle values (< 2^31, concatenated) and their counts (each >= 1)."""
        n, P = len(counts), self.cfg.num_perm
        if n == 0:
            return np.empty((0, P), dtype=np.uint32)
        # Layout (num_perm, documents): every reduction below runs along contiguous memory.
        sig = np.full((P, n), np.iinfo(np.uint64).max, dtype=np.uint64)
        owner = np.repeat(np.arange(n), counts)
        a, b = self.a[:, None], self.b[:, None]
        buf = np.empty((P, BLOCK_ROWS), dtype=np.uint64)
        tmp = np.empty((P, BLOCK_ROWS), dtype=np.uint64)
        for s in range(0, len(x), BLOCK_ROWS):
            xs, own = x[s:s + BLOCK_ROWS], owner[s:s + BLOCK_ROWS]
            m = len(xs)
            y, t = buf[:, :m], tmp[:, :m]
            np.multiply(a, xs[None, :], out=y)
            y += b
            _mod_mersenne31(y, t)
            # A document's shingles are contiguous: reduce each run, then merge into its column
            # (a document cut by a block edge is merged with its other part in the next block).
            starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
            docs = own[starts]
            sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(y, starts, axis=1))
        return np.ascontiguousarray(sig.T).astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of agreeing signature entries (broadcasts over leading dims)."""
    return (sig_a == sig_b).mean(axis=-1)


class MinHashLSH:
    """A streaming LSH index: `add` finds each new document's earlier near-duplicate, then indexes it.

    Every document is indexed, duplicates included, so a chain A~B~C with A and C less similar
    still lands in one cluster; each document's representative is the first document of its cluster.
    """

    def __init__(self, cfg: MinHashConfig) -> None:
        self.cfg = cfg
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(cfg.bands)]
        self.sigs = np.empty((0, cfg.num_perm), dtype=np.uint32)
        self.rep: list[int] = []
        self._n = 0
        rng = np.random.default_rng(cfg.seed + 7919)
        self._mix = rng.integers(1, 2**63, cfg.rows, dtype=np.uint64) | np.uint64(1)

    def __len__(self) -> int:
        return self._n

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: each band's rows combined into one hashable key."""
        r = self.cfg.rows
        bands = sigs[:, : self.cfg.bands * r].astype(np.uint64).reshape(len(sigs), self.cfg.bands, r)
        return splitmix64((bands * self._mix).sum(axis=2))  # wraps mod 2^64; mixing keeps keys uniform

    def _grow(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self.sigs):
            bigger = np.empty((max(need, 2 * len(self.sigs), 1024), self.cfg.num_perm), dtype=np.uint32)
            bigger[: self._n] = self.sigs[: self._n]
            self.sigs = bigger

    def add(self, sigs: np.ndarray, query: bool = True) -> np.ndarray:
        """Index `sigs` in order; return for each the representative index of its cluster, or -1 if new.

        query=False only indexes (reloading stored signatures: no need to re-find their duplicates).
        """
        sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
        keys = self.band_keys(sigs).tolist()
        self._grow(len(sigs))
        out = np.full(len(sigs), -1, dtype=np.int64)
        for i, row_keys in enumerate(keys):
            cands: set[int] = set()
            if query:
                for table, key in zip(self.tables, row_keys):
                    hit = table.get(key)
                    if hit is not None:
                        cands.update(hit)
            idx = self._n
            if cands:
                c = np.fromiter(cands, dtype=np.int64, count=len(cands))
                sim = jaccard_estimate(self.sigs[c], sigs[i])
                best = int(np.argmax(sim))
                if sim[best] >= self.cfg.threshold:
                    out[i] = self.rep[c[best]]
            self.sigs[idx] = sigs[i]
            self.rep.append(idx if out[i] < 0 else int(out[i]))
            for table, key in zip(self.tables, row_keys):
                table.setdefault(key, []).append(idx)
            self._n += 1
        return out

    def signatures(self) -> np.ndarray:
        """The indexed signatures, in insertion order."""
        return self.sigs[: self._n]
