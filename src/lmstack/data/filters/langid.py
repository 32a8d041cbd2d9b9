"""Language identification with langdetect (offline, a port of Google's language-detection).

Every document gets `meta["lang"]` and `meta["lang_prob"]`; the report counts the language mix,
and temperature sampling across languages (mixing.py) reads `meta["lang"]`. With `languages` set,
documents in other languages, or detected with less than `min_prob`, are dropped.

langdetect is randomised; we seed its DetectorFactory so the same text always gets the same answer.

Usage:
    from lmstack.data.filters.langid import LangIdConfig, LangIdFilter, detect_language
    detect_language("Der schnelle braune Fuchs springt über den faulen Hund.")   # ('de', 0.99...)
    result = LangIdFilter(LangIdConfig(languages=["en"]))(batch)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from langdetect import DetectorFactory, detect_langs
from langdetect.lang_detect_exception import LangDetectException

from lmstack.data.document import Doc, StepResult

UNKNOWN = "unknown"


@dataclass
class LangIdConfig:
    """Language identification: annotate every document, optionally keep only some languages."""

    enabled: bool = True
    """Run language identification (annotates meta['lang'] even when nothing is dropped)."""
    languages: list[str] = field(default_factory=list)
    """ISO 639-1 codes to keep (e.g. ['en', 'fr']); empty keeps every language."""
    min_prob: float = 0.0
    """With `languages` set, drop documents whose detected language has a lower probability."""
    max_chars: int = 500
    """Only the first this-many characters are examined (enough to identify a language; langdetect is slow)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"langid.min_prob={self.min_prob} must be in [0, 1]")
        if self.max_chars < 1:
            raise ValueError(f"langid.max_chars={self.max_chars} must be >= 1")


def detect_language(text: str, max_chars: int = 500) -> tuple[str, float]:
    """(language code, probability) of the most likely language; ('unknown', 0.0) for no letters."""

    DetectorFactory.seed = 0
    try:
        best = detect_langs(text[:max_chars])[0]
    except LangDetectException:  # raised for text without any letters
        return UNKNOWN, 0.0
    return best.lang, float(best.prob)


class LangIdFilter:
    """Annotate each document's language; drop those outside `languages` (reason 'lang=<code>')."""

    def __init__(self, cfg: LangIdConfig) -> None:
        self.cfg = cfg
        self.keep = set(cfg.languages)

    def __call__(self, batch: list[Doc]) -> StepResult:
        kept, dropped = [], []
        for doc in batch:
            lang, prob = detect_language(doc["text"], self.cfg.max_chars)
            doc = {**doc, "meta": {**doc["meta"], "lang": lang, "lang_prob": round(prob, 4)}}
            if self.keep and lang not in self.keep:
                dropped.append((doc, f"lang={lang}"))
            elif self.keep and prob < self.cfg.min_prob:
                dropped.append((doc, "low_lang_prob"))
            else:
                kept.append(doc)
        return StepResult(kept, dropped)
