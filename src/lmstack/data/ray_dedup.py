"""Deduplication as Ray Data shuffles: exact duplicates grouped by text hash, near duplicates by LSH band.

The local executor streams documents through one `Deduplicator` index in document order. Here the
same decision is made as a shuffle, so no single process has to hold an index of the corpus:

    exact:  rows (pos, exact hash) are grouped by hash; every member after the first (lowest pos)
            is an exact duplicate of the first.
    near:   every exact survivor is exploded into one row per LSH band (band, band key, pos, sig),
            grouped by (band, key); within a bucket every later member is compared with every
            earlier one, and pairs whose estimated Jaccard reaches the threshold come back.

Why this is the local keep rule: the local MinHashLSH drops document i when the best of its LSH
candidates (earlier indexed documents sharing any band key) has similarity >= threshold, and "the
best reaches the threshold" is the same as "some candidate does". Every exact survivor is indexed
there, duplicates included, so candidates here are all earlier exact survivors too. So i is a near
duplicate iff some confirmed pair (j, i) exists with j < i: a property of pairs, which the shuffle
finds bucket by bucket in any order. Band keys come from `MinHashLSH.band_keys`, the signatures from
the same `MinHasher`: one home for the technique, this module only distributes it.

Groups are formed by a coarse bucket (hash mod n_buckets) so that each reducer call handles
thousands of keys with numpy rather than one Python call per key.

Cluster representatives (report.json's dedup clusters) follow the local rule "representative of the
most similar earlier candidate"; where two candidates tie on similarity the local index picks the
first in a set's iteration order and we pick the earliest document, so the 'largest clusters' list
can differ on such ties. Which documents are dropped never differs.

Usage (inside ray_executor, on a Dataset of exact survivors with columns pos, exact, sig):
    dups = exact_duplicates(docs, n_buckets)                 # {pos: pos of the first copy}
    pairs = near_pairs(survivors, MinHashConfig(), n_buckets) # {pos_i: [(sim, pos_j), ...]}
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lmstack.data.dedup.minhash import MinHashConfig, MinHashLSH, jaccard_estimate


def _bucket(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    return (keys.astype(np.uint64) % np.uint64(n_buckets)).astype(np.int64)


def _exact_reduce(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One bucket of (pos, exact): for each non-first copy, the pos of the first copy."""
    order = np.lexsort((group["pos"], group["exact"]))
    h, pos = group["exact"][order], group["pos"][order]
    first = np.r_[True, h[1:] != h[:-1]]
    first_pos = pos[first][np.cumsum(first) - 1]
    return {"pos": pos[~first], "rep": first_pos[~first]}


def exact_duplicates(docs: Any, n_buckets: int) -> dict[int, int]:
    """{pos: pos of its first exact copy} over a Dataset with columns pos, exact."""
    def add_bucket(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"pos": b["pos"], "exact": b["exact"], "bucket": _bucket(b["exact"], n_buckets)}

    grouped = docs.select_columns(["pos", "exact"]).map_batches(add_bucket, batch_format="numpy")
    out = grouped.groupby("bucket", num_partitions=n_buckets).map_groups(_exact_reduce, batch_format="numpy")
    dups: dict[int, int] = {}
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        dups.update(zip(b["pos"].tolist(), b["rep"].tolist()))
    return dups


def _bands(cfg: MinHashConfig, n_buckets: int):
    lsh = MinHashLSH(cfg)  # only its band-key mixing constants are used: cheap to rebuild per task

    def explode(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per (document, band) with the band key and a coarse bucket."""
        sig = np.asarray(b["sig"], dtype=np.uint32).reshape(len(b["pos"]), -1)
        keys = lsh.band_keys(sig)  # (n, bands) uint64
        n, bands = keys.shape
        band = np.tile(np.arange(bands, dtype=np.int64), n)
        key = keys.reshape(-1)
        # Mix the band index in, so band 3's key k and band 7's key k land in unrelated buckets.
        mixed = key ^ (band.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        return {"bucket": _bucket(mixed, n_buckets), "band": band, "key": key,
                "pos": np.repeat(b["pos"], bands), "exact": np.repeat(b["exact"], bands),
                "sig": np.repeat(sig, bands, axis=0)}
    return explode


def _band_reducer(threshold: float):
    def reduce(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One bucket: pairs (earlier j, later i) sharing a (band, key) with similarity >= threshold."""
        order = np.lexsort((group["pos"], group["key"], group["band"]))
        band, key, pos = group["band"][order], group["key"][order], group["pos"][order]
        exact = group["exact"][order]
        sig = np.asarray(group["sig"], dtype=np.uint32).reshape(len(order), -1)[order]
        starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
        ends = np.r_[starts[1:], len(order)]
        out_i, out_j, out_s = [], [], []
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e - s < 2:
                continue  # most keys hold one document: nothing to compare
            # A member whose exact hash appeared earlier in this run is an exact duplicate, which
            # never reaches the near index; dropping it here keeps big copy clusters from squaring.
            _, first = np.unique(exact[s:e], return_index=True)
            idx = s + np.sort(first)
            if len(idx) < 2:
                continue
            # Rows in chunks: a cluster of k near copies compares k^2 pairs, but holds at most
            # ~4M signature entries at a time (k = 10,000 at once would need 12.8 GB).
            run_sig, run_pos = sig[idx], pos[idx]
            step = max(1, (1 << 22) // (len(idx) * run_sig.shape[1]))
            for c in range(1, len(idx), step):
                rows = np.arange(c, min(c + step, len(idx)))
                sims = jaccard_estimate(run_sig[rows][:, None, :], run_sig[None, : rows[-1], :])
                later, earlier = np.nonzero((sims >= threshold) & (np.arange(rows[-1])[None, :] < rows[:, None]))
                out_i.append(run_pos[rows[later]])
                out_j.append(run_pos[earlier])
                out_s.append(sims[later, earlier])
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dtype=dt))
        return {"i": cat(out_i, np.int64), "j": cat(out_j, np.int64), "sim": cat(out_s, np.float64)}
    return reduce


def near_pairs(survivors: Any, cfg: MinHashConfig, n_buckets: int) -> dict[int, list[tuple[float, int]]]:
    """{pos_i: [(similarity, pos_j), ...]}: every earlier exact survivor j that i near-duplicates.

    `survivors` holds the exact survivors only, with columns pos, exact, sig."""
    exploded = survivors.select_columns(["pos", "exact", "sig"]).map_batches(_bands(cfg, n_buckets),
                                                                             batch_format="numpy")
    out = exploded.groupby("bucket", num_partitions=n_buckets).map_groups(_band_reducer(cfg.threshold), batch_format="numpy")
    pairs: dict[int, set[tuple[float, int]]] = {}
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        for i, j, s in zip(b["i"].tolist(), b["j"].tolist(), b["sim"].tolist()):
            pairs.setdefault(i, set()).add((s, j))  # a pair found in several bands counts once
    return {i: sorted(v) for i, v in pairs.items()}


def near_representatives(order: list[int], pairs: dict[int, list[tuple[float, int]]]) -> dict[int, int]:
    """{pos_i: pos of its cluster's first document} for the near duplicates, walking `order` (sorted pos).

    Like MinHashLSH: the representative of the most similar earlier candidate (ties: the earliest)."""
    rep: dict[int, int] = {}
    for p in order:
        cands = pairs.get(p)
        if cands:
            best = max(cands, key=lambda sj: (sj[0], -sj[1]))[1]
            rep[p] = rep.get(best, best)
    return rep
