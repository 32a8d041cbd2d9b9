"""bad_words: a request's banned words, turned into token ids once and indexed for O(1)-per-step lookups.

A word is banned by banning its last token whenever the tokens before it were just produced. Each
word is encoded twice (alone and after a space: both spellings a BPE model can produce); duplicates
are dropped with a set, so building the index is linear in the total length of the words (a list
search here made 60,000 words take minutes). The index maps each
prefix (a tuple of token ids) to the last tokens it bans, so a decode step costs one dict lookup per
distinct prefix length, whatever the number of words.

Usage:
    bw = BadWords.from_words(tokenizer, ["darn", "heck"], vocab_size=tokenizer.vocab_size)
    bw.banned(output_ids)      # token ids to set to -inf at this step
    BadWords([[4, 5], [2]])    # from token-id lists directly
"""
from __future__ import annotations

from typing import Any, Iterable


class BadWords:
    def __init__(self, word_ids: Iterable[Iterable[int]], vocab_size: int | None = None):
        always: set[int] = set()
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for ids in set(map(tuple, word_ids)):  # a set: duplicates go in O(1) each
            if vocab_size is not None and ids and (min(ids) < 0 or max(ids) >= vocab_size):
                continue  # a token the model cannot emit can never complete the word
            if len(ids) > 1:
                by_prefix.setdefault(ids[:-1], []).append(ids[-1])
            elif ids:
                always.add(ids[0])
        self.always = sorted(always)
        self.by_prefix = by_prefix
        self.prefix_lengths = sorted({len(k) for k in by_prefix})

    @classmethod
    def from_words(cls, tokenizer: Any, words: list[str], vocab_size: int | None = None) -> "BadWords":
        # the word alone and after a space: both spellings a BPE model can produce (dict: dedupe, keep order)
        variants = dict.fromkeys(v for w in words for v in (w, " " + w.lstrip()))
        # one encode() per variant: the tokenizer's piece cache makes each short word cheap (its batched
        # Rust path was slower here for many tiny strings)
        encoded = map(tokenizer.encode, variants)
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        if isinstance(tok_vocab, int) and vocab_size is not None and tok_vocab <= vocab_size:
            vocab_size = None  # every id the tokenizer makes is < its size: no per-word check needed
        return cls(encoded, vocab_size)

    def __len__(self) -> int:
        return len(self.always) + sum(len(v) for v in self.by_prefix.values())

    def banned(self, output_ids: list[int]) -> list[int]:
        """Token ids that would complete a banned word right now."""
        out = list(self.always)
        n = len(output_ids)
        for k in self.prefix_lengths:
            if k > n:
                break
            last = self.by_prefix.get(tuple(output_ids[n - k:]))
            if last:
                out.extend(last)
        return out
