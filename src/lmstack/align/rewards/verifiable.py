"""Verifiable rewards: no model, just a checker. Math answers against the truth, the GSM8K `####` format,
and the synthetic world's instruction checkers.

- `math`: 1 when the number after the completion's last `####` equals the record's answer, else 0.
  The answer is the world's integer `answer`, or GSM8K's answer text ("...#### 72"); the world's
  arithmetic records also carry an `expression`, which is re-evaluated exactly as a cross-check.
- `format`: 1 when the completion ends its reasoning with a `#### <integer>` line, else 0 (a shaping
  term: it teaches the format without saying whether the number is right).
- `instruction`: 1 when the record's checker (lmstack.world.instructions.CHECKERS) accepts the
  completion, else 0.

Usage:
    from lmstack.align.rewards.verifiable import MathReward, InstructionReward
    MathReward()("...", "3 * 4 = 12\\n#### 12", {"answer": 12})                  # 1.0
    MathReward()("...", "#### 72", {"answer": "She has 3 + 69 = 72.\\n#### 72"})  # GSM8K record: 1.0
    InstructionReward()("...", "olleh", {"checker": "reverse_word", "args": {"word": "hello"}})   # 1.0
"""
from __future__ import annotations

import re

from lmstack.align.rewards.base import Reward, register
from lmstack.world.arithmetic import evaluate_expression
from lmstack.world.checkers import extract_answer
from lmstack.world.instructions import CHECKERS, check_instruction
from lmstack.errors import LmstackError

_FINAL_LINE = re.compile(r"(?m)^\s*####\s*-?[\d,]+\s*$")


def target_answer(record: dict) -> int | None:
    """The integer a math record expects: its `answer` (int, numeric string or GSM8K answer text)."""
    answer = record.get("answer")
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer
    if isinstance(answer, float) and answer.is_integer():
        return int(answer)
    if isinstance(answer, str):
        found = extract_answer(answer)
        if found is not None:
            return found
        text = answer.strip().replace(",", "")
        return int(text) if re.fullmatch(r"-?\d+", text) else None
    return None


@register
class MathReward(Reward):
    name = "math"

    def applies(self, record: dict) -> bool:
        return target_answer(record) is not None

    def score(self, prompt: str, completion: str, record: dict) -> float:
        truth = target_answer(record)
        expression = record.get("expression")
        if isinstance(expression, str) and evaluate_expression(expression) != truth:
            raise LmstackError(f"record's expression {expression!r} does not evaluate to its answer {truth}")
        return float(extract_answer(completion) == truth)


@register
class FormatReward(Reward):
    name = "format"

    def score(self, prompt: str, completion: str, record: dict) -> float:
        return float(_FINAL_LINE.search(completion) is not None)


@register
class InstructionReward(Reward):
    name = "instruction"

    def applies(self, record: dict) -> bool:
        return record.get("checker") in CHECKERS

    def score(self, prompt: str, completion: str, record: dict) -> float:
        return float(check_instruction(record, completion))
