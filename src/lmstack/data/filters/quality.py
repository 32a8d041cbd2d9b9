"""Gopher/C4-style quality heuristics, at word level or character level.

`quality_stats(text)` measures a document; `quality_reason(stats, cfg)` names the first rule it
breaks (or None). The rules follow Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020): length,
mean word length, symbol ratio, alphabetic fraction, lines ending in an ellipsis / starting with a
bullet / ending in terminal punctuation, duplicate lines and n-grams, stop-word presence, and the
"lorem ipsum" and curly-bracket markers.

Cost: the length rule runs first, in windows of 1M characters, and a document it drops costs one
linear pass in bounded memory; the other measurements take a few times the document's size. The
readers cut documents over `max_doc_chars` (1M characters by default) into parts before any filter
runs, so no single document can make this step slow or large.

`level` switches between two families of measurements (technique I.13):
- word: counts whitespace-separated words (length in words, duplicate fractions by counts). Cheap,
  and what Gopher does for English, but meaningless for text written without spaces (Chinese,
  Japanese, Thai): such a page is a handful of "words" each hundreds of characters long.
- char: counts characters (length in characters, symbol and alphabetic fractions per character,
  duplicate fractions weighted by characters, repeated character n-grams). Works for any script and
  catches junk hidden inside words (e.g. "w#o$r%d") that word-level ratios cannot see.

Usage:
    from lmstack.data.filters.quality import QualityConfig, QualityFilter
    result = QualityFilter(QualityConfig(min_words=20))(batch)   # StepResult
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmstack.data.document import Doc, StepResult

TERMINAL_PUNCT = (".", "!", "?", '"', "'", "\u201d", "\u2019", ")", "\u3002", "\uff01", "\uff1f")
ELLIPSES = ("...", "\u2026")
BULLETS = ("\u2022", "-", "*", "\u2023", "\u25cf", "\u25aa")
# Punctuation a normal sentence uses; everything else that is not a letter, digit or space is a "symbol".
PLAIN_PUNCT = set(".,;:!?'\"()-\u2019\u201c\u201d\u2014\u3002\uff0c\uff01\uff1f")


@dataclass
class QualityConfig:
    """Thresholds for the heuristic quality filter. A document is dropped at the first rule it breaks."""

    enabled: bool = True
    """Run this filter."""
    level: Literal["word", "char"] = "word"
    """Measure in whitespace words (Gopher) or in characters (any script)."""
    min_words: int = 50
    """word level: fewest words a document may have."""
    max_words: int = 100_000
    """word level: most words a document may have."""
    min_mean_word_length: float = 3.0
    """word level: smallest mean word length (characters)."""
    max_mean_word_length: float = 10.0
    """word level: largest mean word length (characters)."""
    max_symbol_word_ratio: float = 0.1
    """word level: most ('#' + ellipsis) occurrences per word."""
    min_alpha_words: float = 0.8
    """word level: smallest fraction of words containing a letter."""
    max_top_bigram_fraction: float = 0.2
    """word level: largest share of all word bigrams taken by the most frequent one."""
    min_chars: int = 200
    """char level: fewest non-space characters."""
    max_chars: int = 1_000_000
    """char level: most non-space characters."""
    max_symbol_char_ratio: float = 0.1
    """char level: largest fraction of non-space characters that are symbols (not letters, digits or plain punctuation)."""
    min_alpha_chars: float = 0.6
    """char level: smallest fraction of non-space characters that are letters."""
    dup_char_ngram: int = 25
    """char level: length of the character n-grams whose repetition is measured."""
    dup_ngram_n: int = 5
    """word level: length of the word n-grams whose repetition is measured."""
    max_dup_ngram_fraction: float = 0.2
    """Largest fraction of n-grams (word level: by count; char level: characters covered) that repeat."""
    max_dup_line_fraction: float = 0.3
    """Largest fraction of lines (word level: by count; char level: by characters) that repeat an earlier line."""
    max_ellipsis_lines: float = 0.3
    """Largest fraction of lines ending in an ellipsis."""
    max_bullet_lines: float = 0.9
    """Largest fraction of lines starting with a bullet."""
    min_terminal_punct_lines: float = 0.1
    """Smallest fraction of lines ending in terminal punctuation (C4); 0 turns the rule off."""
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    """Stop words whose presence marks natural (English) prose."""
    min_stop_words: int = 2
    """Fewest distinct stop words a document must contain; 0 turns the rule off (do so for non-English corpora)."""
    drop_lorem_ipsum: bool = True
    """Drop documents containing 'lorem ipsum' (placeholder text)."""
    drop_curly_brackets: bool = True
    """Drop documents containing '{' (C4's rule against code and templates)."""

    def __post_init__(self) -> None:
        for name in ("max_symbol_word_ratio", "min_alpha_words", "max_top_bigram_fraction", "max_symbol_char_ratio",
                     "min_alpha_chars", "max_dup_ngram_fraction", "max_dup_line_fraction", "max_ellipsis_lines",
                     "max_bullet_lines", "min_terminal_punct_lines"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"quality.{name}={getattr(self, name)} must be a fraction in [0, 1]")
        if self.dup_ngram_n < 1 or self.dup_char_ngram < 1:
            raise ValueError("quality.dup_ngram_n and quality.dup_char_ngram must be >= 1")


def _repeated_fraction(items: list, weights: list[int] | None = None) -> float:
    """Share of items (optionally weighted) that repeat an earlier identical item."""
    if not items:
        return 0.0
    seen: set = set()
    dup = total = 0
    for i, item in enumerate(items):
        w = weights[i] if weights else 1
        total += w
        if item in seen:
            dup += w
        seen.add(item)
    return dup / total if total else 0.0


def _dup_word_ngram_fraction(words: list[str], n: int) -> float:
    """Fraction of word n-gram positions whose n-gram occurs more than once."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(1 for g in grams if counts[g] > 1) / len(grams)


def _dup_char_ngram_fraction(text: str, n: int) -> float:
    """Fraction of characters covered by a character n-gram that occurs more than once."""
    s = " ".join(text.split())
    if len(s) < 2 * n:
        return 0.0
    grams = [s[i:i + n] for i in range(len(s) - n + 1)]
    counts = Counter(grams)
    starts = np.array([i for i, g in enumerate(grams) if counts[g] > 1], dtype=np.int64)
    if starts.size == 0:
        return 0.0
    cover = np.zeros(len(s) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return float((np.cumsum(cover)[:-1] > 0).mean())


def count_words_and_chars(text: str, chunk: int = 1 << 20) -> tuple[int, int]:
    """(whitespace-separated words, non-space characters), as text.split() would count them, but in
    windows of `chunk` characters so that a huge document never becomes one huge list of words."""
    words = chars = 0
    prev_word_open = False
    for start in range(0, len(text), chunk):
        piece = text[start:start + chunk]
        parts = piece.split()
        words += len(parts)
        chars += sum(map(len, parts))
        if prev_word_open and parts and not piece[0].isspace():
            words -= 1  # the window boundary cut one word in two
        prev_word_open = not piece[-1].isspace()
    return words, chars


def length_reason(text: str, cfg: QualityConfig) -> str | None:
    """The length rule alone (the first rule of both levels), in bounded memory: a document it drops
    is dropped without measuring anything else, so an overlong document costs one linear pass."""
    words, chars = count_words_and_chars(text)
    if cfg.level == "word":
        return "too_few_words" if words < cfg.min_words else "too_many_words" if words > cfg.max_words else None
    return "too_few_chars" if chars < cfg.min_chars else "too_many_chars" if chars > cfg.max_chars else None


def quality_stats(text: str, cfg: QualityConfig | None = None) -> dict[str, float]:
    """Every measurement the rules use, for both levels (cheap ones always, n-gram ones per level)."""
    cfg = cfg or QualityConfig()
    words = text.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Character classes are decided once per distinct character, not once per occurrence.
    counts = [(c, n) for c, n in Counter(text).items() if not c.isspace()]
    n_chars = sum(n for _, n in counts)
    # Likewise per distinct word: natural text repeats its words many times over.
    word_counts = Counter(words)
    lowered = {w: w.lower().strip(".,;:!?'\"()") for w in word_counts}
    lower_words = [lowered[w] for w in words]
    stats = {
        "words": len(words),
        "chars": n_chars,
        "mean_word_length": (sum(map(len, words)) / len(words)) if words else 0.0,
        "symbol_word_ratio": (text.count("#") + sum(text.count(e) for e in ELLIPSES)) / max(len(words), 1),
        "alpha_words": sum(n for w, n in word_counts.items() if any(c.isalpha() for c in w)) / max(len(words), 1),
        # Combining marks (vowel signs of Devanagari, Thai, Burmese...) belong to letters, not symbols.
        "symbol_char_ratio": sum(n for c, n in counts if not c.isalnum() and c not in PLAIN_PUNCT
                                 and not unicodedata.category(c).startswith("M")) / max(n_chars, 1),
        "alpha_chars": sum(n for c, n in counts if c.isalpha() or unicodedata.category(c).startswith("M"))
        / max(n_chars, 1),
        "ellipsis_lines": sum(ln.endswith(ELLIPSES) for ln in lines) / max(len(lines), 1),
        "bullet_lines": sum(ln.startswith(BULLETS) for ln in lines) / max(len(lines), 1),
        "terminal_punct_lines": sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / max(len(lines), 1),
        "stop_words": len(set(cfg.stop_words) & set(lower_words)),
        "lorem_ipsum": float("lorem ipsum" in text.lower()),
        "curly_bracket": float("{" in text),
    }
    if cfg.level == "word":
        stats["dup_lines"] = _repeated_fraction(lines)
        stats["dup_ngrams"] = _dup_word_ngram_fraction(lower_words, cfg.dup_ngram_n)
        bigrams = Counter(zip(lower_words, lower_words[1:]))
        stats["top_bigram"] = max(bigrams.values()) / max(len(words) - 1, 1) if bigrams else 0.0
    else:
        stats["dup_lines"] = _repeated_fraction(lines, [len(ln) for ln in lines])
        stats["dup_ngrams"] = _dup_char_ngram_fraction(text, cfg.dup_char_ngram)
    return stats


def quality_reason(s: dict[str, float], cfg: QualityConfig) -> str | None:
    """The first rule the measurements `s` break, as a reason string, or None if the document passes."""
    if cfg.level == "word":
        checks = [
            (s["words"] < cfg.min_words, "too_few_words"),
            (s["words"] > cfg.max_words, "too_many_words"),
            (not cfg.min_mean_word_length <= s["mean_word_length"] <= cfg.max_mean_word_length, "mean_word_length"),
            (s["symbol_word_ratio"] > cfg.max_symbol_word_ratio, "symbol_ratio"),
            (s["alpha_words"] < cfg.min_alpha_words, "alpha_fraction"),
            (s["top_bigram"] > cfg.max_top_bigram_fraction, "top_bigram"),
        ]
    else:
        checks = [
            (s["chars"] < cfg.min_chars, "too_few_chars"),
            (s["chars"] > cfg.max_chars, "too_many_chars"),
            (s["symbol_char_ratio"] > cfg.max_symbol_char_ratio, "symbol_ratio"),
            (s["alpha_chars"] < cfg.min_alpha_chars, "alpha_fraction"),
        ]
    checks += [
        (s["dup_lines"] > cfg.max_dup_line_fraction, "dup_lines"),
        (s["dup_ngrams"] > cfg.max_dup_ngram_fraction, "dup_ngrams"),
        (s["ellipsis_lines"] > cfg.max_ellipsis_lines, "ellipsis_lines"),
        (s["bullet_lines"] > cfg.max_bullet_lines, "bullet_lines"),
        (s["terminal_punct_lines"] < cfg.min_terminal_punct_lines, "terminal_punct"),
        (s["stop_words"] < cfg.min_stop_words, "stop_words"),
        (cfg.drop_lorem_ipsum and s["lorem_ipsum"] > 0, "lorem_ipsum"),
        (cfg.drop_curly_brackets and s["curly_bracket"] > 0, "curly_bracket"),
    ]
    for broken, reason in checks:
        if broken:
            return reason
    return None


class QualityFilter:
    """Drop documents that break a heuristic rule; the reason is the rule's name."""

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: list[Doc]) -> StepResult:
        kept, dropped = [], []
        for doc in batch:
            reason = length_reason(doc["text"], self.cfg)
            if reason is None:
                reason = quality_reason(quality_stats(doc["text"], self.cfg), self.cfg)
            if reason is None:
                kept.append(doc)
            else:
                dropped.append((doc, reason))
        return StepResult(kept, dropped)
