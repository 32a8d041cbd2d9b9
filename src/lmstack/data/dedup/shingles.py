"""Text normalisation and fast, process-independent 64-bit hashing of words and shingles.

Python's built-in `hash` is salted per process, so signatures saved by one run would not match the
next; every hash here is deterministic. Words are hashed once with blake2b and cached; shingles
(word or character n-grams) are combined from those with vectorised uint64 arithmetic (a
polynomial over the n-gram, wrapping mod 2^64) and then mixed with splitmix64 so every bit is usable.

Usage:
    from lmstack.data.dedup.shingles import normalize, shingle_hashes
    h = shingle_hashes("the quick brown fox jumps over the lazy dog", k=5, kind="word")  # uint64 array, 5 items
"""
from __future__ import annotations

import hashlib
import string
import unicodedata

import numpy as np

# Punctuation becomes a space, then we split on whitespace: 3x faster than re.findall(r"\w+") and the
# same words for ordinary text. "_" stays part of words, as in \w.
_PUNCT = str.maketrans({c: " " for c in string.punctuation.replace("_", "") + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb\u00bf\u00a1"})
_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # an odd multiplier (FNV-64 prime) for the rolling combination
_CACHE: dict[str, int] = {}
_CACHE_MAX = 1 << 20  # words; cleared when full, so memory stays bounded on huge vocabularies


def normalize(text: str) -> str:
    """Canonical form for exact matching: NFKC, lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(words(unicodedata.normalize("NFKC", text)))


def hash64(s: str) -> int:
    """Deterministic 64-bit hash of a string (blake2b)."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a bijection on uint64 that spreads every input bit."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def words(text: str) -> list[str]:
    """Lowercased tokens with punctuation removed, the unit of word shingles."""
    return text.lower().translate(_PUNCT).split()


def word_hashes(tokens: list[str]) -> np.ndarray:
    """uint64 hash of each token, through a per-process cache (most words repeat across documents).

    The cache holds 63-bit values so numpy can read them as int64 (its fast path) and view them as uint64.
    """
    cache = _CACHE
    try:
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.int64, count=len(tokens)).view(_U64)
    except KeyError:
        if len(cache) + len(tokens) > _CACHE_MAX:
            cache.clear()
        for w in tokens:
            if w not in cache:
                cache[w] = hash64(w) >> 1
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.int64, count=len(tokens)).view(_U64)


def units(text: str, kind: str = "word") -> np.ndarray:
    """The uint64 units shingles are made of: word hashes, or code points (+1, so none is 0)."""
    if kind == "word":
        return word_hashes(words(text))
    if kind == "char":
        s = " ".join(text.lower().split())
        return np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(_U64) + _U64(1)
    raise ValueError(f"shingle kind={kind!r}; allowed: 'word', 'char'")


def _roll(u: np.ndarray, k: int) -> np.ndarray:
    """Combine each window of k consecutive uint64 units into one hash (vectorised, wraps mod 2^64)."""
    n = len(u) - k + 1
    acc = u[:n].copy()
    for j in range(1, k):
        acc *= _POLY
        acc += u[j:j + n]
    return splitmix64(acc)


_EMPTY = hash64("")


def _short(u: np.ndarray, k: int) -> np.ndarray:
    """Shingles of a document with fewer than k units: one shingle of all of it (or of '')."""
    return _roll(u, len(u)) if len(u) else np.array([_EMPTY], dtype=_U64)


def shingle_hashes(text: str, k: int = 5, kind: str = "word") -> np.ndarray:
    """uint64 hashes of the word (or character) k-grams of `text`; never empty.

    A text shorter than k units becomes a single shingle of all of it, so short documents still
    get a signature; a text with no units at all hashes as the empty string.
    """
    u = units(text, kind)
    return _roll(u, k) if len(u) >= k else _short(u, k)


def batch_shingle_hashes(texts: list[str], k: int = 5, kind: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many texts at once: (all hashes in document order, count per document).

    Same values as `shingle_hashes` per text, but the rolling hash runs once over the concatenated
    units (windows that straddle two documents are discarded), which removes the per-document
    numpy call overhead that dominates for short documents.
    """
    parts = [units(t, kind) for t in texts]
    lens = np.array([len(p) for p in parts], dtype=np.int64)
    if len(texts) == 0:
        return np.empty(0, dtype=_U64), lens
    flat = np.concatenate(parts) if lens.sum() else np.empty(0, dtype=_U64)
    out_parts: list[np.ndarray] = []
    counts = np.maximum(lens - k + 1, 1)
    if len(flat) >= k:
        rolled = _roll(flat, k)
        owner = np.repeat(np.arange(len(texts)), lens)
        valid = owner[: len(rolled)] == owner[k - 1:]
        long_hashes = rolled[valid]
    else:
        long_hashes = np.empty(0, dtype=_U64)
    short = np.flatnonzero(lens < k)
    if short.size == 0:
        return long_hashes, counts
    # Rare path: splice the one-shingle documents into their places.
    pos = 0
    for i, p in enumerate(parts):
        if lens[i] >= k:
            out_parts.append(long_hashes[pos:pos + counts[i]])
            pos += counts[i]
        else:
            out_parts.append(_short(p, k))
    return np.concatenate(out_parts), counts
