"""The Unigram LM model (SentencePiece style): a vocabulary of pieces with log-probabilities.

Encoding builds the lattice of every vocabulary piece that occurs in a word and takes:
- the Viterbi path (deterministic, identical to HF `tokenizers`: same tie-breaking, unk penalty, unk fusing);
- or, at training time, a path sampled from P(path) ∝ exp(alpha · score) by forward-filtering /
  backward-sampling (subword regularisation, Kudo 2018);
- or the n best paths (used by the context-aware re-ranker).

Usage:
    uni = Unigram(vocab=[["<unk>", 0.0], ["▁a", -1.0], ["b", -2.0], ["▁ab", -2.5]], unk_id=0)
    uni.encode_word("▁ab")                          # -> [3]
    uni.sample_alpha = 0.5; uni.encode_word("▁ab", rng=random.Random(0))   # sometimes [1, 2]
"""
from __future__ import annotations

import heapq
import math
import random

from lmstack.errors import LmstackError

UNK_PENALTY = 10.0  # SentencePiece and HF score an unknown character at min_score - 10


class Unigram:
    def __init__(self, vocab: list, unk_id: int | None = None, byte_fallback: bool = False, **_):
        if not isinstance(vocab, list) or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in vocab):
            raise LmstackError("Unigram vocab must be a list of [piece, score] pairs")
        self.pieces = [(str(p), float(s)) for p, s in vocab]
        self.piece_to_id = {p: i for i, (p, _) in enumerate(self.pieces)}
        if unk_id is not None and not 0 <= unk_id < len(self.pieces):
            raise LmstackError(f"Unigram unk_id {unk_id} is outside the vocab of {len(self.pieces)} pieces")
        self.unk_id, self.byte_fallback = unk_id, byte_fallback
        self.min_score = min((s for _, s in self.pieces), default=0.0)
        self.unk_score = self.min_score - UNK_PENALTY
        self.max_len = max((len(p) for p, _ in self.pieces), default=1)
        self.vocab = {p: i for i, (p, _) in enumerate(self.pieces)}
        self.sample_alpha: float | None = None
        """Smoothing for sampled segmentations at training time; None keeps Viterbi even when training."""

    # -- lattice ---------------------------------------------------------------------------------------
    def _nodes_from(self, w: str, start: int):
        """Pieces starting at `start` as (end, id, score), shortest first; an unk node if no 1-char piece."""
        out, single = [], False
        get = self.piece_to_id.get
        for end in range(start + 1, min(len(w), start + self.max_len) + 1):
            i = get(w[start:end])
            if i is not None:
                out.append((end, i, self.pieces[i][1]))
                if end == start + 1:
                    single = True
        if not single:
            if self.unk_id is None:
                raise LmstackError(f"character {w[start]!r} is not in the Unigram vocab and there is no unk_id")
            out.append((start + 1, -1, self.unk_score))  # -1 marks an unk node
        return out

    def viterbi(self, w: str) -> list[tuple[int, int, int]]:
        """Best path as (start, end, id) with id -1 for unknown characters."""
        n = len(w)
        score = [0.0] * (n + 1)
        back: list[tuple[int, int] | None] = [None] * (n + 1)
        for start in range(n):
            base = score[start]
            for end, i, s in self._nodes_from(w, start):
                cand = s + base
                if back[end] is None or cand > score[end]:
                    score[end], back[end] = cand, (start, i)
        path, end = [], n
        while end > 0:
            start, i = back[end]
            path.append((start, end, i))
            end = start
        path.reverse()
        return path

    def sample(self, w: str, alpha: float, rng: random.Random) -> list[tuple[int, int, int]]:
        """Sample a path with probability proportional to exp(alpha * path score)."""
        n = len(w)
        nodes = [self._nodes_from(w, s) for s in range(n)]
        ending: list[list[tuple[int, int, float]]] = [[] for _ in range(n + 1)]
        fwd = [-math.inf] * (n + 1)
        fwd[0] = 0.0
        for start in range(n):
            if fwd[start] == -math.inf:
                continue
            for end, i, s in nodes[start]:
                v = fwd[start] + alpha * s
                ending[end].append((start, i, v))
                fwd[end] = _logaddexp(fwd[end], v)
        path, end = [], n
        while end > 0:
            r, acc = rng.random(), 0.0
            choice = ending[end][-1]
            for cand in ending[end]:
                acc += math.exp(cand[2] - fwd[end])
                if r < acc:
                    choice = cand
                    break
            start, i, _ = choice
            path.append((start, end, i))
            end = start
        path.reverse()
        return path

    def nbest(self, w: str, k: int) -> list[tuple[float, list[tuple[int, int, int]]]]:
        """The k highest-scoring paths (score, path), best first."""
        n = len(w)
        best: list[list[tuple[float, int, int, int]]] = [[] for _ in range(n + 1)]  # (score, start, id, rank)
        best[0] = [(0.0, -1, -1, -1)]
        for start in range(n):
            if not best[start]:
                continue
            for end, i, s in self._nodes_from(w, start):
                for rank, entry in enumerate(best[start]):
                    best[end].append((entry[0] + s, start, i, rank))
            if start + 1 <= n:
                best[start + 1] = heapq.nlargest(k, best[start + 1], key=lambda e: e[0])
        best[n] = heapq.nlargest(k, best[n], key=lambda e: e[0])
        results = []
        for entry in best[n]:
            path, end, e = [], n, entry
            while end > 0:
                sc, start, i, rank = e
                path.append((start, end, i))
                e, end = best[start][rank], start
            path.reverse()
            results.append((entry[0], path))
        return results

    # -- ids -------------------------------------------------------------------------------------------
    def path_to_ids(self, w: str, path: list[tuple[int, int, int]]) -> list[int]:
        # Fuse runs of unknown characters into one token, then map strings to ids like HF does.
        strings, pending = [], ""
        for start, end, i in path:
            if i == -1:
                pending += w[start:end]
                continue
            if pending:
                strings.append(pending)
                pending = ""
            strings.append(w[start:end])
        if pending:
            strings.append(pending)
        ids = []
        for s in strings:
            i = self.piece_to_id.get(s)
            if i is not None:
                ids.append(i)
                continue
            if self.byte_fallback:
                fb = [self.piece_to_id.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if None not in fb:
                    ids.extend(fb)
                    continue
            ids.append(self.unk_id)
        return ids

    def encode_word(self, w: str, rng: random.Random | None = None) -> list[int]:
        if not w:
            return []
        if rng is not None and self.sample_alpha is not None:
            return self.path_to_ids(w, self.sample(w, self.sample_alpha, rng))
        return self.path_to_ids(w, self.viterbi(w))

    def to_json(self) -> dict:
        return {"type": "Unigram", "unk_id": self.unk_id, "vocab": [[p, s] for p, s in self.pieces],
                "byte_fallback": self.byte_fallback}


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))
