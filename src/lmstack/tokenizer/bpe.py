"""The BPE model: turn one pre-tokenized piece into ids by applying learned merges, as HF `tokenizers` does.

Merges apply lowest rank first, leftmost first (a heap over adjacent pairs, like HF's Word::merge_all), so
ids match the Rust runtime for any tokenizer.json, ours or HF's. BPE-dropout (Provilkov et al. 2020) skips
each popped merge with probability `dropout`; it only runs when the caller passes an `rng`, i.e. when
encoding for training. Inference stays deterministic.

Usage:
    bpe = BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[["a", "b"]])
    bpe.encode_word("abab")                          # -> [2, 2]
    bpe.encode_word("abab", rng=random.Random(0))    # with bpe.dropout = 0.5: sometimes [0, 1, 2]
"""
from __future__ import annotations

import heapq
import random

from lmstack.errors import LmstackError


def parse_merges(merges: list, vocab: dict[str, int], prefix: str | None) -> dict[tuple[int, int], tuple[int, int]]:
    """HF merges (["a", "b"] pairs or legacy "a b" strings) -> {(id_a, id_b): (rank, id_new)}."""
    table: dict[tuple[int, int], tuple[int, int]] = {}
    plen = len(prefix) if prefix else 0
    for rank, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise LmstackError(f"BPE merge #{rank} {m!r} is not two tokens separated by one space")
            a, b = parts
        elif isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        else:
            raise LmstackError(f"BPE merge #{rank} {m!r} must be a pair of strings")
        new = a + (b[plen:] if plen and b.startswith(prefix) else b)
        for t in (a, b, new):
            if t not in vocab:
                raise LmstackError(f"BPE merge #{rank} ({a!r}, {b!r}) uses {t!r}, which is not in the vocab")
        table[(vocab[a], vocab[b])] = (rank, vocab[new])
    return table


class BPE:
    def __init__(self, vocab: dict[str, int], merges: list, unk_token: str | None = None,
                 continuing_subword_prefix: str | None = None, end_of_word_suffix: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False,
                 dropout: float | None = None, **_):
        if not isinstance(vocab, dict):
            raise LmstackError("BPE vocab must be a mapping of token -> id")
        self.vocab = vocab
        self.merge_list = [list(m.split(" ")) if isinstance(m, str) else list(m) for m in merges]
        self.merges = parse_merges(merges, vocab, continuing_subword_prefix)
        if unk_token is not None and unk_token not in vocab:
            raise LmstackError(f"BPE unk_token {unk_token!r} is not in the vocab")
        self.unk_token, self.prefix, self.suffix = unk_token, continuing_subword_prefix, end_of_word_suffix
        self.fuse_unk, self.byte_fallback, self.ignore_merges = fuse_unk, byte_fallback, ignore_merges
        self.dropout = float(dropout or 0.0)
        """Probability of skipping a merge, applied only when encode_word gets an rng (training time)."""

    def _initial(self, w: str) -> list[int]:
        vocab, ids, unk = self.vocab, [], None
        last = len(w) - 1
        for i, ch in enumerate(w):
            s = ch
            if i > 0 and self.prefix:
                s = self.prefix + s
            if i == last and self.suffix:
                s = s + self.suffix
            tid = vocab.get(s)
            if tid is not None:
                if unk is not None:
                    ids.append(unk)
                    unk = None
                ids.append(tid)
                continue
            if self.byte_fallback:
                fb = [vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if None not in fb:
                    ids.extend(fb)
                    continue
            if self.unk_token is None:
                raise LmstackError(f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary and the "
                                   "tokenizer has no unk token or byte fallback")
            if unk is not None and not self.fuse_unk:
                ids.append(unk)
            unk = vocab[self.unk_token]
        if unk is not None:
            ids.append(unk)
        return ids

    def encode_word(self, w: str, rng: random.Random | None = None) -> list[int]:
        if not w:
            return []
        if self.ignore_merges and w in self.vocab:
            return [self.vocab[w]]
        ids = self._initial(w)
        n = len(ids)
        if n < 2 or not self.merges:
            return ids
        merges = self.merges
        p = self.dropout if rng is not None else 0.0
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = merges.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        skipped = []
        while heap:
            top = heapq.heappop(heap)
            if p and rng.random() < p:
                skipped.append(top)
                continue
            for s in skipped:  # dropped merges come back after the next merge, as in HF
                heapq.heappush(heap, s)
            skipped.clear()
            _, pos, new = top
            if not alive[pos]:
                continue
            j = nxt[pos]
            if j == -1:
                continue
            m = merges.get((ids[pos], ids[j]))
            if m is None or m[1] != new:
                continue  # stale entry: a neighbour changed since it was pushed
            ids[pos] = new
            alive[j] = False
            nj = nxt[j]
            nxt[pos] = nj
            if nj != -1:
                prv[nj] = pos
                m = merges.get((new, ids[nj]))
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
            pp = prv[pos]
            if pp != -1:
                m = merges.get((ids[pp], new))
                if m is not None:
                    heapq.heappush(heap, (m[0], pp, m[1]))
        return [t for t, a in zip(ids, alive) if a]

    def to_json(self) -> dict:
        return {"type": "BPE", "dropout": None, "unk_token": self.unk_token,
                "continuing_subword_prefix": self.prefix, "end_of_word_suffix": self.suffix,
                "fuse_unk": self.fuse_unk, "byte_fallback": self.byte_fallback, "ignore_merges": self.ignore_merges,
                "vocab": self.vocab, "merges": self.merge_list}
