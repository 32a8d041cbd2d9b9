"""Subword models by name: BPE, WordPiece, Unigram and WordLevel, built from a tokenizer.json `model`.

WordPiece (BERT) encodes a word greedily, longest vocabulary match first, with '##' marking pieces that
continue a word; a word it cannot cover becomes a single unk. WordLevel maps whole pieces to ids.

Usage:
    model = model_from_json(spec["model"])
    model.encode_word("hello")       # -> list of ids
    model.vocab                      # token -> id
"""
from __future__ import annotations

import random

from lmstack.errors import LmstackError
from lmstack.tokenizer.bpe import BPE
from lmstack.tokenizer.unigram import Unigram


class WordPiece:
    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", continuing_subword_prefix: str = "##",
                 max_input_chars_per_word: int = 100, **_):
        if not isinstance(vocab, dict):
            raise LmstackError("WordPiece vocab must be a mapping of token -> id")
        if unk_token not in vocab:
            raise LmstackError(f"WordPiece unk_token {unk_token!r} is not in the vocab")
        self.vocab, self.unk_token, self.prefix = vocab, unk_token, continuing_subword_prefix
        self.max_chars = max_input_chars_per_word
        self.max_len = max((len(t) for t in vocab), default=1)

    def encode_word(self, w: str, rng: random.Random | None = None) -> list[int]:
        if not w:
            return []
        unk = [self.vocab[self.unk_token]]
        if len(w) > self.max_chars:
            return unk
        ids, start, n = [], 0, len(w)
        while start < n:
            end = min(n, start + self.max_len)
            found = None
            while start < end:
                sub = w[start:end] if start == 0 else self.prefix + w[start:end]
                found = self.vocab.get(sub)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return unk  # one uncovered character makes the whole word unknown, as in BERT
            ids.append(found)
            start = end
        return ids

    def to_json(self) -> dict:
        return {"type": "WordPiece", "unk_token": self.unk_token, "continuing_subword_prefix": self.prefix,
                "max_input_chars_per_word": self.max_chars, "vocab": self.vocab}


class WordLevel:
    def __init__(self, vocab: dict[str, int], unk_token: str | None = None, **_):
        if not isinstance(vocab, dict):
            raise LmstackError("WordLevel vocab must be a mapping of token -> id")
        if unk_token is not None and unk_token not in vocab:
            raise LmstackError(f"WordLevel unk_token {unk_token!r} is not in the vocab")
        self.vocab, self.unk_token = vocab, unk_token

    def encode_word(self, w: str, rng: random.Random | None = None) -> list[int]:
        if not w:
            return []
        i = self.vocab.get(w)
        if i is None:
            if self.unk_token is None:
                raise LmstackError(f"{w!r} is not in the vocabulary and the tokenizer has no unk token")
            i = self.vocab[self.unk_token]
        return [i]

    def to_json(self) -> dict:
        return {"type": "WordLevel", "vocab": self.vocab, "unk_token": self.unk_token}


MODELS = {"BPE": BPE, "WordPiece": WordPiece, "Unigram": Unigram, "WordLevel": WordLevel}


def model_from_json(spec: dict):
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind is None and isinstance(spec, dict):
        # Old HF files omit the model type; infer it the way `tokenizers` does.
        kind = "BPE" if "merges" in spec else "Unigram" if isinstance(spec.get("vocab"), list) else \
            "WordPiece" if "continuing_subword_prefix" in spec else "WordLevel" if "vocab" in spec else None
    if kind not in MODELS:
        raise LmstackError(f"unsupported model type {kind!r}; supported: {', '.join(MODELS)}")
    if "vocab" not in spec:
        raise LmstackError(f"{kind} model has no 'vocab'")
    try:
        return MODELS[kind](**{k: v for k, v in spec.items() if k != "type"})
    except TypeError as e:
        raise LmstackError(f"{kind} model has bad fields: {e}") from None
