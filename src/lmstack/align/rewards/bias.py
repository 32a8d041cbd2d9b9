"""Bias reward: a counterfactual twin prompt (the same request with the person's name and gender swapped) must
get the same answer and the same sentiment (issue 21, IX.7).

A record that takes part carries `bias_pair` (an id shared by the two twins) and `bias_side` ("female" or
"male"); lmstack.safety.bias builds such records from the world. The reward of a completion c of one twin is its
agreement with the *twin group*, the samples of the other twin's prompt:

    arithmetic records (an `answer`):  share of twin samples whose answer (first `####`) equals c's answer;
                                       0 when c gives no answer (two silent twins must not count as agreeing)
    other records:                     1 - |s(c) - mean_twin s| / 2        s = sentiment(text) in [-1, 1]

So 1 pays agreement and 0 is the largest disagreement. Like every fairness penalty it is also met by saying nothing
polar to anyone (sentiment 0 for both twins): keep a KL anchor (kl_coef) or a task reward beside it, and watch
measure_disparity's `polar` share. The answer share is the chance that a twin sample agrees,
which is what measure_disparity's answer_disparity counts (1 - it, over pairs); it is not a correctness reward,
so it is mixed with `math` (--reward math=1,bias=0.5).

Rewards see one sample at a time, so the twin group comes from one of two places:
  - `observe(prompts, texts, records)`: the current rollout, given before scoring (exact: both twins sampled by
    the same policy). `BiasGroupTrainer` (lmstack.safety.bias_rl) does this and rolls both twins out together.
  - otherwise a memory of the last `memory` samples seen for each twin (lagged: the other twin's samples from an
    earlier step), which is what a plain `lmstack align --method grpo --reward math=1,bias=0.5` run gets.
With no twin sample seen yet the reward is 1.0 for every sample of that prompt: a constant within a GRPO group,
so it moves no advantage (rather than NaN, which would drop the group's math reward too).

Sentiment is a lexicon (`sentiment`): polarity words of the world's replies (work, character, feelings: the
world's FEELINGS are in it), a negator within three words before flips a word; the score is
(pos - neg) / (pos + neg), 0 for a text without polarity words.

Usage:
    from lmstack.align.rewards.bias import BiasReward, sentiment
    sentiment("Ada is a careful and brilliant engineer.")     # 1.0
    sentiment("Ada is not a good engineer.")                  # -1.0
    r = BiasReward()
    r.observe(prompts, texts, records)                        # the rollout: both twins' samples
    r(prompt, completion, {"bias_pair": "p3", "bias_side": "female", "answer": 12})
"""
from __future__ import annotations

from collections import deque
import re
from typing import Iterable, Sequence

from lmstack.align.rewards.base import Reward, register
from lmstack.errors import LmstackError
from lmstack.world.checkers import extract_answer

POSITIVE_WORDS = (
    "good", "great", "excellent", "brilliant", "skilled", "skillful", "talented", "careful", "kind", "reliable",
    "helpful", "admired", "respected", "successful", "creative", "clever", "wonderful", "outstanding", "impressive",
    "friendly", "generous", "honest", "patient", "capable", "thoughtful", "praised", "best", "love", "loved",
    "loves", "enjoys", "proud", "happy", "calm", "excited", "bright", "strong", "precise", "dedicated", "trusted",
    "excels", "fine", "superb", "diligent", "competent", "gifted", "warm", "inspiring", "valued", "fair", "smart",
    "wise", "neat", "thorough", "efficient", "cheerful", "beloved", "admirable", "remarkable",
)
NEGATIVE_WORDS = (
    "bad", "poor", "poorly", "terrible", "awful", "lazy", "careless", "sloppy", "rude", "unreliable", "incompetent",
    "weak", "clumsy", "dishonest", "lousy", "mediocre", "worst", "failed", "fails", "fail", "failure", "mistakes",
    "hated", "disliked", "complained", "complaints", "worried", "sad", "nervous", "angry", "tired", "boring",
    "dull", "messy", "useless", "unhelpful", "disappointing", "disappointed", "inept", "unfair", "cruel", "selfish",
    "foolish", "stupid", "slow", "wrong", "shoddy", "unpleasant", "hopeless", "careless", "negligent", "bitter",
)
NEGATORS = ("not", "never", "no", "hardly", "barely", "nor")
_POS, _NEG, _NOT = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS), frozenset(NEGATORS)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
NEGATION_WINDOW = 3
"""A negator flips a polarity word at most this many words after it ("not a very good" flips "good")."""

SIDES = ("female", "male")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def has_polarity(text: str) -> bool:
    """Whether the text holds any polarity word (a sentiment of 0 may be balance or silence)."""
    return any(w in _POS or w in _NEG for w in _words(text))


def sentiment(text: str) -> float:
    """Lexicon sentiment in [-1, 1]: (pos - neg) / (pos + neg) over polarity words, negation flipped; 0 if none."""
    words = _words(text)
    pos = neg = 0
    last_negator = -NEGATION_WINDOW - 1
    for i, w in enumerate(words):
        if w in _NOT or w.endswith("n't"):
            last_negator = i
            continue
        polarity = 1 if w in _POS else -1 if w in _NEG else 0
        if not polarity:
            continue
        if i - last_negator <= NEGATION_WINDOW:
            polarity = -polarity
        pos, neg = pos + (polarity > 0), neg + (polarity < 0)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def twin_side(side: str) -> str:
    if side not in SIDES:
        raise LmstackError(f"bias_side must be one of {', '.join(SIDES)}, got {side!r}")
    return SIDES[1 - SIDES.index(side)]


def is_answer_record(record: dict) -> bool:
    """Arithmetic twins are compared by answer; everything else by sentiment."""
    return record.get("answer") is not None


def reply_value(completion: str, record: dict) -> float | int | None:
    """What twins must agree on: the first `####` answer (as the SFT stage scores arithmetic), or the sentiment."""
    return extract_answer(completion, first=True) if is_answer_record(record) else sentiment(completion)


def agreement_score(value, twin_values: Sequence, by_answer: bool) -> float:
    """1 = agrees with the twin group, 0 = the largest disagreement (see the module docstring)."""
    if by_answer:
        return sum(v == value for v in twin_values) / len(twin_values) if value is not None else 0.0
    return 1.0 - abs(value - sum(twin_values) / len(twin_values)) / 2.0


@register
class BiasReward(Reward):
    name = "bias"

    def __init__(self, memory: int = 16):
        if not isinstance(memory, int) or memory < 1:
            raise LmstackError(f"bias reward memory must be an integer >= 1, got {memory!r}")
        self.memory = memory
        self._batch: dict[tuple[str, str], list] = {}
        self._seen: dict[tuple[str, str], deque] = {}

    def applies(self, record: dict) -> bool:
        return record.get("bias_pair") is not None and record.get("bias_side") in SIDES

    def observe(self, prompts: Sequence[str], texts: Sequence[str], records: Sequence[dict]) -> None:
        """The current rollout: each twin's samples become the group its twin is compared with (replaces the
        previous rollout's; the lagged memory is kept for twins this rollout lacks)."""
        if not len(prompts) == len(texts) == len(records):
            raise LmstackError(f"observe needs as many prompts ({len(prompts)}), texts ({len(texts)}) and records "
                               f"({len(records)})")
        batch: dict[tuple[str, str], list] = {}
        for text, record in zip(texts, records):
            if self.applies(record):
                key = (str(record["bias_pair"]), record["bias_side"])
                batch.setdefault(key, []).append(reply_value(text, record))
        self._batch = batch
        for key, values in batch.items():
            self._seen.setdefault(key, deque(maxlen=self.memory)).extend(values)

    def twin_values(self, record: dict) -> list:
        key = (str(record["bias_pair"]), twin_side(record["bias_side"]))
        return list(self._batch.get(key) or self._seen.get(key) or ())

    def score(self, prompt: str, completion: str, record: dict) -> float:
        value = reply_value(completion, record)
        twins = self.twin_values(record)
        key = (str(record["bias_pair"]), record["bias_side"])
        if key not in self._batch:  # not given by observe(): remember it for the twin's later scoring
            self._seen.setdefault(key, deque(maxlen=self.memory)).append(value)
        if not twins:
            return 1.0
        return agreement_score(value, twins, is_answer_record(record))


def bias_rewards(reward) -> Iterable[BiasReward]:
    """The BiasReward instances in a reward: itself, or the components of a mixture."""
    if isinstance(reward, BiasReward):
        yield reward
    for part, _ in getattr(reward, "parts", {}).values():
        yield from bias_rewards(part)


def observe_rollout(reward, prompts: Sequence[str], texts: Sequence[str], records: Sequence[dict]) -> int:
    """Give a rollout to every bias component of `reward`; returns how many there were."""
    found = list(bias_rewards(reward))
    for r in found:
        r.observe(prompts, texts, records)
    return len(found)
