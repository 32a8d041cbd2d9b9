"""Readability filter: Flesch-Kincaid grade level (and Flesch reading ease) via textstat.

Drops text that is too hard (run-on, jargon-dense, or garbled text with very long "sentences")
or too easy (word lists, menus, fragments) for the target corpus. Both scores are English
formulas (syllables per word, words per sentence), so the filter is off by default and should
only be switched on for English sources.

Usage:
    from lmstack.data.filters.readability import ReadabilityConfig, ReadabilityFilter, readability
    readability("The cat sat on the mat.")            # {'fk_grade': -1.4..., 'reading_ease': 116...}
    result = ReadabilityFilter(ReadabilityConfig(enabled=True, max_grade=12))(batch)
"""
from __future__ import annotations

from dataclasses import dataclass

from lmstack.data.document import Doc, StepResult


@dataclass
class ReadabilityConfig:
    """Keep documents whose Flesch-Kincaid grade (and reading ease) lie in a range."""

    enabled: bool = False
    """Run this filter (English only: the formulas count English syllables)."""
    min_grade: float = -5.0
    """Smallest Flesch-Kincaid grade level kept."""
    max_grade: float = 18.0
    """Largest Flesch-Kincaid grade level kept (18 is post-graduate prose)."""
    min_reading_ease: float = -100.0
    """Smallest Flesch reading-ease score kept (lower is harder; -100 keeps nearly everything)."""

    def __post_init__(self) -> None:
        if self.min_grade > self.max_grade:
            raise ValueError(f"readability.min_grade={self.min_grade} must be <= max_grade={self.max_grade}")


_CMUDICT: bool | None = None


def _has_cmudict() -> bool:
    """Whether NLTK's CMU dictionary is installed (textstat's English syllable source)."""
    global _CMUDICT
    if _CMUDICT is None:
        try:
            # lazy: optional extra (nltk)
            import nltk

            nltk.data.find("corpora/cmudict")
            _CMUDICT = True
        except (ImportError, LookupError):
            _CMUDICT = False
    return _CMUDICT


def readability(text: str) -> dict[str, float]:
    """Flesch-Kincaid grade and Flesch reading ease of `text`.

    With NLTK's cmudict installed this is textstat's own computation. Without it, textstat 0.7
    would try to download cmudict at run time, which we never do; we then use textstat's word and
    sentence counts and pyphen hyphenation for syllables (textstat's own fallback for words
    missing from cmudict) in the same two formulas.
    """
    # lazy: heavy (textstat), which this module does not import at its top
    import textstat

    if _has_cmudict():
        return {"fk_grade": float(textstat.flesch_kincaid_grade(text)),
                "reading_ease": float(textstat.flesch_reading_ease(text))}
    # lazy: optional extra (pyphen)
    import pyphen
    # lazy: heavy (textstat), which this module does not import at its top
    from textstat.backend.selections._list_words import list_words

    words = list_words(text, lowercase=True)
    if not words:
        return {"fk_grade": 0.0, "reading_ease": 206.835}
    dic = pyphen.Pyphen(lang="en_US")
    syllables = sum(len(dic.positions(w)) + 1 for w in words)
    per_sentence = len(words) / max(textstat.sentence_count(text), 1)
    per_word = syllables / len(words)
    return {"fk_grade": 0.39 * per_sentence + 11.8 * per_word - 15.59,
            "reading_ease": 206.835 - 1.015 * per_sentence - 84.6 * per_word}


class ReadabilityFilter:
    """Annotate meta['fk_grade']; drop with reason 'too_hard', 'too_easy' or 'low_reading_ease'."""

    def __init__(self, cfg: ReadabilityConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: list[Doc]) -> StepResult:
        kept, dropped = [], []
        for doc in batch:
            scores = readability(doc["text"])
            doc = {**doc, "meta": {**doc["meta"], "fk_grade": round(scores["fk_grade"], 2)}}
            if scores["fk_grade"] > self.cfg.max_grade:
                dropped.append((doc, "too_hard"))
            elif scores["fk_grade"] < self.cfg.min_grade:
                dropped.append((doc, "too_easy"))
            elif scores["reading_ease"] < self.cfg.min_reading_ease:
                dropped.append((doc, "low_reading_ease"))
            else:
                kept.append(doc)
        return StepResult(kept, dropped)
