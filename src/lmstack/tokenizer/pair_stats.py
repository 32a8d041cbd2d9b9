"""Incremental pair counts for merge-based trainers (BPE, WordPiece).

The corpus is reduced to its unique pre-token words with frequencies. We count adjacent symbol pairs over
those words once, and keep an index pair -> words that contain it. Applying a merge then touches only the
words that contain the merged pair and adjusts the counts of the pairs around each occurrence; the corpus is
never rescanned (the issue's requirement, and what makes training fast).

Pairs are packed into one int key (a * SHIFT + b): int hashing is much cheaper than tuple hashing in the
hot loop.

Usage:
    stats = PairStats(words=[[0, 1, 2], [1, 2]], freqs=[3, 5])
    stats.counts[stats.key(1, 2)]          # -> 8
    new_pairs = stats.merge(1, 2, new=3)   # returns the keys of the pairs it created
    stats.word(0), stats.word(1)           # -> [0, 3], [3]
"""
from __future__ import annotations

from collections import defaultdict

SHIFT = 1 << 24  # symbol ids must stay below 16.7M


class PairStats:
    def __init__(self, words: list[list[int]], freqs: list[int], track_units: bool = False):
        self.freqs = freqs
        counts: dict[int, int] = defaultdict(int)
        where: dict[int, list[int]] = defaultdict(list)
        for wi, w in enumerate(words):
            f = freqs[wi]
            for x, y in zip(w, w[1:]):
                k = x * SHIFT + y
                counts[k] += f
                where[k].append(wi)
        # Words are kept as strings with one character per symbol (chr(id)): finding a pair is str.find and
        # applying a merge is str.replace, both in C, which is exactly BPE's left-to-right non-overlapping rule.
        self.words = ["".join(map(chr, w)) for w in words]
        self.counts, self.where = counts, where
        self.units: dict[int, int] | None = None
        if track_units:  # WordPiece's likelihood score needs each symbol's own frequency
            units: dict[int, int] = defaultdict(int)
            for w, f in zip(words, freqs):
                for x in w:
                    units[x] += f
            self.units = units

    @staticmethod
    def key(a: int, b: int) -> int:
        return a * SHIFT + b

    @staticmethod
    def unkey(k: int) -> tuple[int, int]:
        return divmod(k, SHIFT)

    def word(self, wi: int) -> list[int]:
        return [ord(c) for c in self.words[wi]]

    def merge(self, a: int, b: int, new: int) -> set[int]:
        """Replace every occurrence of (a, b) by `new`; return the keys of pairs that gained counts."""
        counts, where, words, freqs, units = self.counts, self.where, self.words, self.freqs, self.units
        created: set[int] = set()
        ab, cn = chr(a) + chr(b), chr(new)
        # where[] may list a word twice or list words that lost the pair since: dedupe, and find() skips them.
        for wi in set(where.pop(a * SHIFT + b, ())):
            w = words[wi]
            i = w.find(ab)
            if i < 0:
                continue
            f = freqs[wi]
            n = len(w)
            last_end = -1
            while i >= 0:
                # The pairs around this occurrence change: (p, a) -> (p, new) and (b, q) -> (new, q). When the
                # previous occurrence ends right here, the left neighbour is already the new symbol.
                if i > 0:
                    p = new if i == last_end else ord(w[i - 1])
                    counts[p * SHIFT + a] -= f
                    k = p * SHIFT + new
                    counts[k] += f
                    where[k].append(wi)
                    created.add(k)
                if i + 2 < n:
                    q = ord(w[i + 2])
                    counts[b * SHIFT + q] -= f
                    k = new * SHIFT + q
                    counts[k] += f
                    where[k].append(wi)
                    created.add(k)
                if units is not None:
                    units[a] -= f
                    units[b] -= f
                    units[new] += f
                last_end = i + 2
                i = w.find(ab, last_end)
            words[wi] = w.replace(ab, cn)
        counts.pop(a * SHIFT + b, None)
        return created
