"""train_tokenizer: corpus (files or texts) + TokenizerConfig -> a Tokenizer in HF tokenizer.json form.

The config picks the pipeline (presets.py), words are counted once (corpus.py), and a trainer from the
TRAINERS registry learns the model. Special tokens take the first ids. The result saves as an HF
tokenizer.json that `tokenizers` loads with identical ids.

Usage:
    tok = train_tokenizer(["input.txt"], type="bpe", vocab_size=4096)
    tok = train_tokenizer(texts=["some text", "more text"], type="unigram", vocab_size=500)
    tok = train_tokenizer(["input.txt"], config=TokenizerConfig(type="char"))
    tok = train_tokenizer(["code.py"], type="bpe", vocab_size=2048, split_digits=True, space_runs=16)  # hybrid

A string item is a file when such a file exists; a string without whitespace that looks like a path
(has a '/' or a text-file suffix) but does not exist is an error, anything else is text. Use `texts=` to be
explicit.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from lmstack.config import from_dict, to_dict
from lmstack.errors import LmstackError
from lmstack.tokenizer.bpe_train import check_vocab_size, train_bpe
from lmstack.tokenizer.chat_template import SPECIAL_NAMES, UNK_NAME, special_token
from lmstack.tokenizer.config import TokenizerConfig
from lmstack.tokenizer.core import Tokenizer
from lmstack.tokenizer.corpus import count_words, read_corpus
from lmstack.tokenizer.normalizers import normalizer_from_json
from lmstack.tokenizer.presets import bos_template, pipeline, space_run_strings
from lmstack.tokenizer.pretokenizers import pretokenizer_from_json
from lmstack.tokenizer.unigram_train import train_unigram
from lmstack.tokenizer.wordpiece_train import train_wordpiece


def special_list(cfg: TokenizerConfig) -> list[str]:
    """Special tokens in id order. WordPiece and Unigram need an unk inside the model, so it comes first."""
    out = [special_token(UNK_NAME)] if cfg.type in ("wordpiece", "unigram") else []
    if cfg.special_tokens == "chat":
        out += [special_token(n) for n in SPECIAL_NAMES]
    return out


def _train_bpe(texts, normalizer, pre_tokenizer, cfg: TokenizerConfig, specials):
    counts = count_words(texts, normalizer, pre_tokenizer, cfg.num_workers)
    byte_level = cfg.pretokenizer in ("gpt4", "gpt2")
    return train_bpe(counts, cfg.vocab_size, specials, byte_level, cfg.min_frequency,
                     space_run_strings(cfg.space_runs), cfg.character_coverage, cfg.show_progress)


def _train_wordpiece(texts, normalizer, pre_tokenizer, cfg: TokenizerConfig, specials):
    counts = count_words(texts, normalizer, pre_tokenizer, cfg.num_workers)
    if not counts:
        raise LmstackError("the training corpus has no words after normalization")
    return train_wordpiece(counts, cfg.vocab_size, specials, cfg.min_frequency, cfg.show_progress)


def _train_unigram(texts, normalizer, pre_tokenizer, cfg: TokenizerConfig, specials):
    counts = count_words(texts, normalizer, pre_tokenizer, cfg.num_workers, drop=specials)
    return train_unigram(counts, cfg.vocab_size, specials, cfg.max_piece_length, cfg.seed_size,
                         cfg.shrinking_factor, cfg.em_iterations, cfg.character_coverage, cfg.show_progress,
                         cfg.byte_fallback)


def _train_char(texts, normalizer, pre_tokenizer, cfg: TokenizerConfig, specials):
    # nanoGPT's Shakespeare vocabulary: the sorted set of characters; id = position (after any specials).
    chars = sorted(set().union(*map(set, texts)))
    check_vocab_size(cfg.vocab_size, len(chars), len(specials), "distinct characters")
    vocab = {s: i for i, s in enumerate(specials + [c for c in chars if c not in specials])}
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": []}


TRAINERS: dict[str, Callable] = {"bpe": _train_bpe, "wordpiece": _train_wordpiece, "unigram": _train_unigram,
                                 "char": _train_char}


def build_spec(model: dict, parts: dict, specials: list[str]) -> dict:
    """Assemble a full tokenizer.json dict around a trained model."""
    added = [{"id": model_id(model, s), "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in specials]
    bos = special_token("bos")
    bos_id = model_id(model, bos) if bos in specials else None
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": parts["normalizer"], "pre_tokenizer": parts["pre_tokenizer"],
            "post_processor": bos_template(bos if bos_id is not None else None, bos_id),
            "decoder": parts["decoder"], "model": model}


def model_id(model: dict, token: str) -> int:
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        return vocab[token]
    return next(i for i, (p, _) in enumerate(vocab) if p == token)


def train_tokenizer(files_or_texts: Iterable[str | os.PathLike] | str | None = None, type: str | None = None,
                    vocab_size: int | None = None, *, config: TokenizerConfig | None = None,
                    texts: Iterable[str] | None = None, **overrides) -> Tokenizer:
    """Train a tokenizer. Keyword overrides are TokenizerConfig fields (unknown names are an error)."""
    given = {k: v for k, v in (("type", type), ("vocab_size", vocab_size)) if v is not None}
    given.update(overrides)
    if config is None:
        cfg = from_dict(TokenizerConfig, given)
    else:
        cfg = from_dict(TokenizerConfig, {**to_dict(config), **given}) if given else config
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    corpus, stats = read_corpus(list(files_or_texts or []), cfg.invalid_utf8, texts=list(texts or []))
    specials = special_list(cfg)
    parts = pipeline(cfg)
    normalizer = normalizer_from_json(parts["normalizer"])
    pre_tokenizer = pretokenizer_from_json(parts["pre_tokenizer"])
    model = TRAINERS[cfg.type](corpus, normalizer, pre_tokenizer, cfg, specials)
    spec = build_spec(model, parts, specials)
    config = {"lmstack": {"type": cfg.type, "config": to_dict(cfg), "training": stats, "seed": cfg.seed,
                          "dropout": cfg.dropout, "sample_alpha": cfg.sample_alpha}}
    return Tokenizer(spec, config, source="<trained>")


__all__ = ["TokenizerConfig", "train_tokenizer", "TRAINERS", "special_list", "build_spec"]
