"""Unigram LM training (SentencePiece style, Kudo 2018): EM over segmentations, then vocabulary pruning.

1. Seed: every character plus the most frequent substrings (up to max_piece_length) of the words, scored
   and initialised by frequency x length.
2. EM: the E-step runs forward-backward over each word's lattice of pieces to get expected piece counts;
   the M-step turns them into log-probabilities with the Bayesian (digamma) update SentencePiece uses and
   drops pieces expected less than half a time.
3. Prune: for each piece, estimate how much the corpus likelihood drops if it is removed and its Viterbi
   uses are re-segmented with the piece's own second-best split; keep the `shrinking_factor` share with the
   largest loss. Repeat 2-3 until the vocabulary is small enough, then keep the top pieces by score.
Characters are always kept, so every covered character stays encodable.

Usage:
    model = train_unigram({"▁hello": 5, "▁help": 3}, vocab_size=40, specials=["<|unk|>"])
"""
from __future__ import annotations

import math

from tqdm import tqdm

from lmstack.tokenizer.bpe_train import BYTE_FALLBACK_TOKENS, check_vocab_size, covered_alphabet
from lmstack.tokenizer.unigram import Unigram

SPECIAL_SCORE = -1e6  # specials sit in the vocab (ids first) but must never win a Viterbi path


def digamma(x: float) -> float:
    r = 0.0
    while x < 6.0:
        r -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    return r + math.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))


def _split_uncovered(word_counts: dict[str, int], chars: set[str]) -> tuple[list[str], list[int]]:
    words, freqs = [], []
    for w, c in word_counts.items():
        run = ""
        for ch in w + "\0":
            if ch in chars:
                run += ch
            else:
                if run:
                    words.append(run)
                    freqs.append(c)
                run = ""
    return words, freqs


def _seed(words: list[str], freqs: list[int], chars: set[str], max_len: int, seed_size: int,
          reserved: set[str]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for w, c in zip(words, freqs):
        n = len(w)
        for i in range(n):
            for j in range(i + 2, min(n, i + max_len) + 1):
                s = w[i:j]
                counts[s] = counts.get(s, 0) + c
    # Start from frequency x length, as SentencePiece does: long frequent substrings start out likely, so the
    # first E-step concentrates on them instead of spreading mass over every overlapping split.
    ranked = sorted(((c * len(s), s) for s, c in counts.items() if c > 1 and s not in reserved), reverse=True)
    seeds = {s: float(score) for score, s in ranked[:seed_size]}
    for w, c in zip(words, freqs):
        for ch in w:
            seeds[ch] = seeds.get(ch, 0.0) + c
    total = sum(seeds.values())
    return {s: math.log(c) - math.log(total) for s, c in seeds.items()}


def _model(pieces: dict[str, float]) -> Unigram:
    return Unigram([[p, s] for p, s in pieces.items()], unk_id=None)


def _lae(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


class Lattices:
    """For every word, the (start, end, piece) nodes of the pieces still in the vocabulary, by start.

    Pieces only ever leave the vocabulary, so the lattices are built once from the seeds and then filtered,
    instead of looking up every substring of every word in every EM iteration."""

    def __init__(self, words: list[str], freqs: list[int], pieces: dict[str, float], max_len: int):
        self.words, self.freqs = words, freqs
        self.nodes: list[list[tuple[int, int, str]]] = []
        for w in words:
            n = len(w)
            self.nodes.append([(i, j, w[i:j]) for i in range(n) for j in range(i + 1, min(n, i + max_len) + 1)
                               if w[i:j] in pieces])

    def keep(self, pieces: dict[str, float]) -> None:
        self.nodes = [[nd for nd in nodes if nd[2] in pieces] for nodes in self.nodes]

    def e_step(self, pieces: dict[str, float]) -> tuple[dict[str, float], float]:
        """Expected count of every piece under the current model (forward-backward), and the log-likelihood."""
        # Probabilities are scaled by exp(shift * length): all paths through a word have the same total length,
        # so the scaling cancels in the posteriors and keeps long products from underflowing.
        shift = -sum(s / len(p) for p, s in pieces.items()) / len(pieces)
        prob = {p: math.exp(s + shift * len(p)) for p, s in pieces.items()}
        expected = dict.fromkeys(pieces, 0.0)
        objective = 0.0
        for w, c, nodes in zip(self.words, self.freqs, self.nodes):
            n = len(w)
            fwd = [0.0] * (n + 1)
            fwd[0] = 1.0
            for s, e, p in nodes:
                fwd[e] += fwd[s] * prob[p]
            z = fwd[n]
            if not 0.0 < z < math.inf:
                objective += c * self._e_step_log(n, c, nodes, pieces, expected)
                continue
            bwd = [0.0] * (n + 1)
            bwd[n] = 1.0
            for s, e, p in reversed(nodes):
                bwd[s] += prob[p] * bwd[e]
            scale = c / z
            for s, e, p in nodes:
                expected[p] += scale * fwd[s] * prob[p] * bwd[e]
            objective += c * (math.log(z) - shift * n)
        return expected, objective

    @staticmethod
    def _e_step_log(n, c, nodes, pieces, expected) -> float:
        # Log-space fallback for very long words (unsegmented scripts) where even scaled products overflow.
        fwd = [-math.inf] * (n + 1)
        fwd[0] = 0.0
        for s, e, p in nodes:
            fwd[e] = _lae(fwd[e], fwd[s] + pieces[p])
        bwd = [-math.inf] * (n + 1)
        bwd[n] = 0.0
        for s, e, p in reversed(nodes):
            bwd[s] = _lae(bwd[s], pieces[p] + bwd[e])
        z = fwd[n]
        for s, e, p in nodes:
            expected[p] += c * math.exp(fwd[s] + pieces[p] + bwd[e] - z)
        return z

    def viterbi_counts(self, pieces: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """Per piece: how often it is on a best path, and the total frequency of the words using it."""
        freq = dict.fromkeys(pieces, 0.0)
        users = dict.fromkeys(pieces, 0.0)
        for w, c, nodes in zip(self.words, self.freqs, self.nodes):
            n = len(w)
            best = [-math.inf] * (n + 1)
            best[0] = 0.0
            back: list = [None] * (n + 1)
            for s, e, p in nodes:
                v = best[s] + pieces[p]
                if v > best[e]:
                    best[e], back[e] = v, (s, p)
            used, e = set(), n
            while e > 0:
                s, p = back[e]
                freq[p] += c
                used.add(p)
                e = s
            for p in used:
                users[p] += c
        return freq, users


def _m_step(expected: dict[str, float], chars: set[str]) -> dict[str, float]:
    kept = {}
    for p, e in expected.items():
        if p in chars:
            kept[p] = max(e, 0.5)  # characters always stay, however rare
        elif e >= 0.5:
            kept[p] = e
    # SentencePiece's Bayesian update: digamma instead of log shrinks the scores of rare pieces.
    total = digamma(sum(kept.values()))
    return {p: digamma(e) - total for p, e in kept.items()}


def _prune(pieces: dict[str, float], lattices: Lattices, chars: set[str], target: int) -> dict[str, float]:
    freq, users = lattices.viterbi_counts(pieces)
    total = sum(freq.values())
    vsum = sum(lattices.freqs)
    log_total = math.log(total)
    model = _model(pieces)
    keep: dict[str, float] = {}
    candidates = []
    for p, score in pieces.items():
        if p in chars:
            keep[p] = score
            continue
        if freq[p] == 0:
            continue  # never on a best path: free to drop
        alt = [path for _, path in model.nbest(p, 2) if len(path) > 1]
        if not alt:
            keep[p] = score
            continue
        # If p goes, its uses are re-segmented by its second-best split: the loss is the drop in likelihood,
        # weighted by the share of words that use p.
        alt_pieces = [p[s:e] for s, e, _ in alt[0]]
        log_total_alt = math.log(total + freq[p] * (len(alt_pieces) - 1))
        logp_piece = math.log(freq[p]) - log_total
        logp_alt = sum(math.log(freq[q] + freq[p]) - log_total_alt for q in alt_pieces)
        candidates.append((users[p] / vsum * (logp_piece - logp_alt), p, score))
    candidates.sort(reverse=True)
    for _, p, score in candidates:
        if len(keep) >= target:
            break
        keep[p] = score
    return keep


def train_unigram(word_counts: dict[str, int], vocab_size: int, specials: list[str], max_piece_length: int = 16,
                  seed_size: int = 100_000, shrinking_factor: float = 0.75, em_iterations: int = 2,
                  character_coverage: float = 1.0, show_progress: bool = False, byte_fallback: bool = False
                  ) -> dict:
    # Byte pieces (byte fallback) are reserved like specials: only reached through unk, never by matching.
    reserved = list(specials) + (BYTE_FALLBACK_TOKENS if byte_fallback else [])
    # Characters of the reserved pieces are required too: then spelling "<|bos|>" or "<0x41>" out of characters
    # is always cheaper than the reserved piece itself, so plain text never produces its id.
    chars = set(covered_alphabet(word_counts, character_coverage)) | {ch for s in reserved for ch in s}
    check_vocab_size(vocab_size, len(chars) + len(reserved) - len(specials), len(specials),
                     "characters" + (" + 256 byte-fallback pieces" if byte_fallback else ""))
    words, freqs = _split_uncovered(word_counts, chars)
    pieces = _seed(words, freqs, chars, max_piece_length, seed_size, set(reserved))
    for ch in chars:
        pieces.setdefault(ch, min(pieces.values(), default=0.0) - 1.0)
    target = vocab_size - len(reserved)
    bar = tqdm(desc="unigram", disable=not show_progress, leave=False)
    lattices = Lattices(words, freqs, pieces, max_piece_length)
    while True:
        for _ in range(em_iterations):
            expected, objective = lattices.e_step(pieces)
            pieces = _m_step(expected, chars)
            lattices.keep(pieces)
            bar.set_postfix(pieces=len(pieces), loglik=f"{objective:.4g}")
            bar.update(1)
        if len(pieces) <= target:
            break
        before = len(pieces)
        pieces = _prune(pieces, lattices, chars, max(target, int(len(pieces) * shrinking_factor)))
        lattices.keep(pieces)
        if len(pieces) >= before:
            break  # nothing left that pruning may remove; the final cut below decides
    bar.close()
    # Final cut: all characters, then the best-scoring pieces until the vocabulary is full.
    others = sorted((kv for kv in pieces.items() if kv[0] not in chars), key=lambda kv: (-kv[1], kv[0]))
    final = dict(kv for kv in pieces.items() if kv[0] in chars)
    final.update(others[: max(0, target - len(final))])
    ranked = sorted(final.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [[s, SPECIAL_SCORE] for s in specials] + [[p, s] for p, s in ranked]
    vocab += [[b, SPECIAL_SCORE] for b in reserved[len(specials):]]
    return {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": byte_fallback}
