"""Toxicity / content-policy filter: word lists, blocked phrases, and an optional trained classifier.

An automatic content-moderation pipeline in three layers, cheapest first:
1. blocked phrases (policy): any hit drops the document, e.g. the synthetic world's fictional
   harmful category "forbidden potion";
2. a word list of insults and profanity: the document is dropped when the words make up more than
   `max_word_fraction` of it and appear at least `min_word_hits` times (one swear word in a long
   article is not toxic content);
3. a hashed n-gram classifier trained on toxic/non-toxic examples (filters/classifier.py), whose
   positive class is 'toxic'.

The built-in word list is deliberately small and mild; real deployments pass `wordlist` (one word
or phrase per line).

Usage:
    from lmstack.data.filters.toxicity import ToxicityConfig, ToxicityFilter, toxic_hits
    toxic_hits("you stupid idiot")                        # 2
    result = ToxicityFilter(ToxicityConfig(blocked_phrases=["forbidden potion"]))(batch)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.data.document import Doc, StepResult
from lmstack.data.filters.classifier import HashedNgramClassifier
from lmstack.errors import LmstackError

DEFAULT_WORDS = (
    "idiot", "idiots", "stupid", "moron", "morons", "dumbass", "imbecile", "loser", "losers", "scum",
    "shit", "shitty", "bullshit", "crap", "damn", "fuck", "fucking", "fucker", "bastard", "bastards",
    "asshole", "assholes", "bitch", "piss", "jerk", "worthless", "pathetic", "disgusting", "shut up",
    "kill yourself", "go to hell", "i hate you",
)


def _compile(words: list[str] | tuple[str, ...]) -> re.Pattern | None:
    words = [w.strip().lower() for w in words if w.strip()]
    if not words:
        return None
    # Longest first, so "kill yourself" wins over a shorter entry; \b keeps "scumble" from matching "scum".
    alts = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alts})\b", re.IGNORECASE)


_DEFAULT_RE = _compile(DEFAULT_WORDS)


def toxic_hits(text: str, pattern: re.Pattern | None = _DEFAULT_RE) -> int:
    """How many word-list entries occur in `text`."""
    return len(pattern.findall(text)) if pattern else 0


@dataclass
class ToxicityConfig:
    """Content moderation: blocked phrases, a toxic word list, an optional classifier."""

    enabled: bool = True
    """Run this filter."""
    wordlist: str = ""
    """File with one toxic word/phrase per line; empty uses the small built-in list."""
    max_word_fraction: float = 0.02
    """Drop when toxic words exceed this fraction of all words..."""
    min_word_hits: int = 2
    """...and occur at least this many times."""
    blocked_phrases: list[str] = field(default_factory=list)
    """Policy phrases: any occurrence drops the document (reason 'policy')."""
    classifier: str = ""
    """Directory of a hashed n-gram classifier whose positive class is 'toxic'; empty: none."""
    classifier_threshold: float = 0.8
    """Drop when P(toxic) >= this."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_word_fraction <= 1.0 or not 0.0 <= self.classifier_threshold <= 1.0:
            raise ValueError("toxicity.max_word_fraction and toxicity.classifier_threshold must be in [0, 1]")
        if self.min_word_hits < 1:
            raise ValueError(f"toxicity.min_word_hits={self.min_word_hits} must be >= 1")


class ToxicityFilter:
    """Drop documents with reasons 'policy', 'toxic_words' or 'toxic_classifier'."""

    def __init__(self, cfg: ToxicityConfig) -> None:
        self.cfg = cfg
        if cfg.wordlist:
            try:
                words = Path(cfg.wordlist).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise LmstackError(f"toxicity.wordlist {cfg.wordlist}: {e}") from None
            self.words = _compile(words)
        else:
            self.words = _DEFAULT_RE
        self.blocked = _compile(cfg.blocked_phrases)
        self.clf = HashedNgramClassifier.load(cfg.classifier) if cfg.classifier else None

    def __call__(self, batch: list[Doc]) -> StepResult:
        kept, dropped = [], []
        survivors = []
        for doc in batch:
            if self.blocked and self.blocked.search(doc["text"]):
                dropped.append((doc, "policy"))
                continue
            hits = toxic_hits(doc["text"], self.words)
            n_words = max(len(doc["text"].split()), 1)
            if hits >= self.cfg.min_word_hits and hits / n_words > self.cfg.max_word_fraction:
                dropped.append((doc, "toxic_words"))
                continue
            survivors.append(doc)
        if self.clf is not None and survivors:
            p = self.clf.predict_proba([d["text"] for d in survivors])
            for doc, prob in zip(survivors, p):
                if prob >= self.cfg.classifier_threshold:
                    dropped.append((doc, "toxic_classifier"))
                else:
                    kept.append(doc)
        else:
            kept = survivors
        return StepResult(kept, dropped)
