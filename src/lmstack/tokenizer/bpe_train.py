"""BPE training (Sennrich et al. 2016; byte-level as in GPT-2): learn merges from pre-token word counts.

Input is the corpus reduced to unique pre-token words with frequencies (see `counting.py`). Pair counts are
built once and updated incrementally after every merge (`PairStats`); a max-heap with lazy invalidation
finds the most frequent pair (ties: smallest pair of ids, as HF's trainer does). A merge whose result would
spell a reserved string (a special token) is never learned, so plain text can never produce a special id.

`forced` strings are built first, merge by merge, before anything is learned: the hybrid code mode uses it so
runs of spaces (indentation) are always single tokens.

Usage:
    model = train_bpe({"Ġhello": 10, "Ġworld": 5}, vocab_size=300, specials=["<|bos|>"], byte_level=True)
    # -> a tokenizer.json "model" dict: {"type": "BPE", "vocab": {...}, "merges": [[a, b], ...], ...}
"""
from __future__ import annotations

import heapq

from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.tokenizer.bpe import BPE
from lmstack.tokenizer.pair_stats import SHIFT, PairStats
from lmstack.tokenizer.pretokenizers import BYTE_TO_CHAR

BYTE_FALLBACK_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def covered_alphabet(word_counts: dict[str, int], coverage: float) -> list[str]:
    """The most frequent characters covering `coverage` of all character occurrences (SentencePiece's
    character_coverage); the rest are left to byte fallback or unk."""
    chars: dict[str, int] = {}
    for w, c in word_counts.items():
        for ch in w:
            chars[ch] = chars.get(ch, 0) + c
    ranked = sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))
    total, kept, acc = sum(chars.values()), [], 0
    for ch, c in ranked:
        if acc >= coverage * total and kept:
            break
        kept.append(ch)
        acc += c
    return sorted(kept)


def check_vocab_size(vocab_size: int, n_alphabet: int, n_special: int, what: str) -> None:
    if vocab_size < n_alphabet + n_special:
        raise LmstackError(
            f"vocab_size={vocab_size} is smaller than the base alphabet ({n_alphabet} {what}) plus the special "
            f"tokens ({n_special}); use vocab_size >= {n_alphabet + n_special}")


class MergeLearner:
    """Vocabulary + merges under construction, shared by BPE training and vocabulary expansion."""

    def __init__(self, symbols: list[str], words: list[list[int]], freqs: list[int], reserved: set[str]):
        self.symbols = symbols
        self.index = {s: i for i, s in enumerate(symbols)}
        self.stats = PairStats(words, freqs)
        self.merges: list[list[str]] = []
        self.reserved = reserved

    def apply(self, a: int, b: int) -> set[int]:
        s = self.symbols[a] + self.symbols[b]
        new = self.index.get(s)
        if new is None:  # two merges can spell the same string; they then share one id, as in HF
            new = len(self.symbols)
            self.symbols.append(s)
            self.index[s] = new
        self.merges.append([self.symbols[a], self.symbols[b]])
        return self.stats.merge(a, b, new)

    def force(self, piece: str) -> None:
        """Add merges until `piece` (in symbol characters) encodes to a single token: encode it with the merges
        so far, merge its first two tokens, repeat. Each new merge ranks last, so it fires exactly there."""
        while True:
            ids = BPE(self.index, self.merges).encode_word(piece)
            if len(ids) < 2:
                return
            self.apply(ids[0], ids[1])

    def learn(self, vocab_size: int, min_frequency: int, show_progress: bool = False, desc: str = "bpe") -> None:
        counts = self.stats.counts
        heap = [(-c, k) for k, c in counts.items() if c >= min_frequency]
        heapq.heapify(heap)
        banned: set[int] = set()
        bar = tqdm(total=max(0, vocab_size - len(self.symbols)), desc=desc, disable=not show_progress,
                   mininterval=0.5, leave=False)
        while len(self.symbols) < vocab_size and heap:
            negc, k = heapq.heappop(heap)
            c = counts.get(k, 0)
            if c != -negc:  # stale entry: the count dropped since it was pushed
                if c >= min_frequency:
                    heapq.heappush(heap, (-c, k))
                continue
            if k in banned:
                continue
            a, b = divmod(k, SHIFT)
            if self.symbols[a] + self.symbols[b] in self.reserved:
                banned.add(k)
                continue
            before = len(self.symbols)
            for nk in self.apply(a, b):
                nc = counts.get(nk, 0)
                if nc >= min_frequency:
                    heapq.heappush(heap, (-nc, nk))
            bar.update(len(self.symbols) - before)
        bar.close()


def train_bpe(word_counts: dict[str, int], vocab_size: int, specials: list[str], byte_level: bool = True,
              min_frequency: int = 2, forced: list[str] | None = None, character_coverage: float = 1.0,
              show_progress: bool = False) -> dict:
    """Learn a BPE model over `word_counts` (pieces already pre-tokenized, byte-mapped when byte_level)."""
    if byte_level:
        alphabet = [BYTE_TO_CHAR[b] for b in range(256)]  # every byte: any text is encodable, losslessly
        base = list(specials) + alphabet
        what = "byte symbols"
    else:
        # SentencePiece-style BPE over characters, with byte fallback for characters left out by coverage.
        alphabet = covered_alphabet(word_counts, character_coverage)
        base = list(specials) + BYTE_FALLBACK_TOKENS + [c for c in alphabet if c not in BYTE_FALLBACK_TOKENS]
        what = "characters + 256 byte-fallback tokens"
    check_vocab_size(vocab_size, len(base) - len(specials), len(specials), what)
    index = {s: i for i, s in enumerate(base)}
    words, freqs = [], []
    for w, c in word_counts.items():
        if len(w) < 2:
            continue
        try:
            words.append([index[ch] for ch in w])
            freqs.append(c)
            continue
        except KeyError:
            pass
        # Characters outside the alphabet split a word: they never take part in merges.
        run: list[int] = []
        for ch in w:
            i = index.get(ch)
            if i is None:
                if len(run) > 1:
                    words.append(run)
                    freqs.append(c)
                run = []
            else:
                run.append(i)
        if len(run) > 1:
            words.append(run)
            freqs.append(c)
    # No learned token may spell a special token or a byte-fallback token: text could then reach its id.
    reserved = set(specials) | (set() if byte_level else set(BYTE_FALLBACK_TOKENS))
    learner = MergeLearner(base, words, freqs, reserved=reserved)
    for s in forced or []:
        if all(ch in learner.index for ch in s):
            learner.force(s)
    learner.learn(vocab_size, min_frequency, show_progress)
    vocab = {s: i for i, s in enumerate(learner.symbols)}
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": not byte_level,
            "ignore_merges": False, "vocab": vocab, "merges": learner.merges}
