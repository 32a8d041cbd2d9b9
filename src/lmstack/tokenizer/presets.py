"""Pipeline presets: the tokenizer.json normalizer / pre_tokenizer / decoder / post_processor for a config.

Everything we train is expressed in HF's tokenizer.json vocabulary of components, so `tokenizers` loads
our files and runs them with identical ids. Registries map a pre-tokenizer name to its builder.

Usage:
    parts = pipeline(TokenizerConfig(type="bpe", split_digits=True))
    parts["pre_tokenizer"]   # Sequence[Split(GPT-4 pattern with single digits), ByteLevel]
"""
from __future__ import annotations

from typing import Callable

from lmstack.tokenizer.config import TokenizerConfig
from lmstack.tokenizer.morpheme import morpheme_split_json
from lmstack.tokenizer.pretokenizers import GPT2_PATTERN, GPT4_DIGITS_PATTERN, GPT4_PATTERN

METASPACE = "\u2581"


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(cfg: TokenizerConfig, pattern: str) -> dict:
    steps = [_split(pattern)]
    if cfg.morphemes != "none":
        steps.append(morpheme_split_json(cfg.morphemes))
    # The regex split runs first; ByteLevel then only maps bytes to printable characters (use_regex off).
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }


def _gpt4(cfg: TokenizerConfig) -> dict:
    return _byte_level(cfg, GPT4_DIGITS_PATTERN if cfg.split_digits else GPT4_PATTERN)


def _gpt2(cfg: TokenizerConfig) -> dict:
    return _byte_level(cfg, GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}") if cfg.split_digits else GPT2_PATTERN)


def _with_digits(cfg: TokenizerConfig, step: dict) -> dict:
    if not cfg.split_digits:
        return step
    return {"type": "Sequence", "pretokenizers": [step, {"type": "Digits", "individual_digits": True}]}


def _metaspace(cfg: TokenizerConfig) -> dict:
    # SentencePiece's "no whitespace assumption": spaces become the visible '▁' and belong to the next
    # piece, so languages written without spaces (Chinese, Thai) are segmented like any other text.
    # Newlines are cut out first so each line is its own sentence, as SentencePiece reads its input; only
    # the very start of the text gets a '▁' prepended ("first"), so decoding restores every line exactly.
    step = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated", "invert": False},
        {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "first", "split": True}]}
    decoder = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "first", "split": True}
    if cfg.type == "bpe" or cfg.byte_fallback:  # unseen characters are kept as bytes: <0xE4><0xB8>...
        decoder = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, decoder]}
    return {"normalizer": None, "pre_tokenizer": _with_digits(cfg, step), "decoder": decoder}


def _bert(cfg: TokenizerConfig) -> dict:
    return {
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": cfg.lowercase},
        "pre_tokenizer": _with_digits(cfg, {"type": "BertPreTokenizer"}),
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
    }


def _none(cfg: TokenizerConfig) -> dict:
    # Characters: the whole text is one piece, split into characters by a BPE with no merges.
    return {"normalizer": None, "pre_tokenizer": None, "decoder": {"type": "Fuse"}}


PRETOKENIZER_PRESETS: dict[str, Callable[[TokenizerConfig], dict]] = {
    "gpt4": _gpt4, "gpt2": _gpt2, "metaspace": _metaspace, "bert": _bert, "none": _none,
}


def pipeline(cfg: TokenizerConfig) -> dict:
    return PRETOKENIZER_PRESETS[cfg.pretokenizer](cfg)


def bos_template(bos: str | None, bos_id: int | None) -> dict | None:
    """encode(add_special_tokens=True) prepends <|bos|>."""
    if bos is None or bos_id is None:
        return None
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def space_run_strings(space_runs: int) -> list[str]:
    """Byte-level strings of the whitespace runs the hybrid mode makes into single tokens."""
    if space_runs < 2:
        return []
    space, tab = "\u0120", "\u0109"  # byte-level spellings of ' ' and '\t'
    return [space * n for n in range(2, space_runs + 1)] + [tab * n for n in range(2, max(2, space_runs // 4) + 1)]
