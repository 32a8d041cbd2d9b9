"""Cheap helpfulness heuristics: a length reward and a slightly smarter helpfulness score.

These are the kind of proxy a weak reward model learns ("longer answers were preferred"), kept
here on purpose: they are the single reward that RL *hacks* (a long wrong answer beats a short right
one), which the mixture of rewards in mixture.py is shown to resist.

- `length`: min(words / target_words, cap). Monotone in length up to the cap.
- `helpfulness`: length saturating at `target_words`, minus a penalty for dismissive stock phrases
  ("look that up yourself", "not sure") and for repeating the same sentence; plus a bonus when the
  completion mentions the capitalised names the prompt asks about. In [−1, 1].

Usage:
    from lmstack.align.rewards.heuristics import LengthReward, HelpfulnessReward
    LengthReward(target_words=50)("Q", "a b c d e", {})        # 0.1
"""
from __future__ import annotations

import re

from lmstack.align.rewards.base import Reward, register
from lmstack.errors import LmstackError

_WORD = re.compile(r"[A-Za-z0-9']+")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*")
DISMISSIVE = ("look that up yourself", "not sure", "no idea", "i don't know", "google it", "can't be bothered")


def n_words(text: str) -> int:
    return len(_WORD.findall(text))


@register
class LengthReward(Reward):
    name = "length"

    def __init__(self, target_words: int = 50, cap: float = 3.0):
        if target_words < 1 or cap <= 0:
            raise LmstackError(f"length reward needs target_words >= 1 and cap > 0, got {target_words}, {cap}")
        self.target_words, self.cap = target_words, cap

    def score(self, prompt: str, completion: str, record: dict) -> float:
        return min(n_words(completion) / self.target_words, self.cap)


@register
class HelpfulnessReward(Reward):
    name = "helpfulness"

    def __init__(self, target_words: int = 30):
        if target_words < 1:
            raise LmstackError(f"helpfulness reward needs target_words >= 1, got {target_words}")
        self.target_words = target_words

    def score(self, prompt: str, completion: str, record: dict) -> float:
        text = completion.lower()
        score = min(n_words(completion) / self.target_words, 1.0)
        if any(p in text for p in DISMISSIVE):
            score -= 1.0
        sentences = [s.strip() for s in re.split(r"[.!?]\s*", text) if s.strip()]
        if sentences and len(set(sentences)) < len(sentences):
            score -= 1 - len(set(sentences)) / len(sentences)  # padding by repetition is not help
        asked = [n for n in _NAME.findall(prompt)[1:] if len(n) > 2]  # skip the sentence's first word
        if asked and any(n.lower() in text for n in asked):
            score += 0.25
        return max(-1.0, min(1.0, score))
