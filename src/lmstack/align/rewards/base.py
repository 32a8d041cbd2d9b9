"""The Reward interface: a function of (prompt, completion, record) -> float, with a registry of named rewards.

`record` is the dataset row the prompt came from (a synthetic-world record: its `answer`,
`checker`/`args`, `person`/`attribute`, `label`, ...), so rule-based rewards can verify a
completion without a model. A reward that cannot judge a record (no answer to check against)
says so through `applies(record)`, and `score` then returns NaN. RL loops treat NaN as "no
reward": the sample is left out of its group's baseline (see rl_math.group_advantages).

Usage:
    from lmstack.align.rewards import build_reward, score_batch
    reward = build_reward("math")
    reward("What is 2 + 3?", "2 + 3 = 5\\n#### 5", {"answer": 5})     # 1.0
    score_batch(reward, prompts, completions, records)                 # (N,) float tensor, NaN = n/a
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch

from lmstack.errors import LmstackError


class Reward(abc.ABC):
    """Base class. Subclasses set `name` and implement `score`; override `applies` when a reward needs
    something in the record."""

    name = "base"

    def applies(self, record: dict) -> bool:
        return True

    @abc.abstractmethod
    def score(self, prompt: str, completion: str, record: dict) -> float:
        """The reward of one completion (called only when applies(record))."""

    def __call__(self, prompt: str, completion: str, record: dict | None = None) -> float:
        record = record or {}
        if not isinstance(completion, str):
            raise LmstackError(f"reward {self.name!r}: completion must be a string, got {type(completion).__name__}")
        if not self.applies(record):
            return float("nan")
        return float(self.score(prompt, completion, record))


REWARDS: dict[str, Callable[..., Reward]] = {}
"""name -> Reward class; filled by the reward modules as they are imported (see rewards/__init__.py)."""


def register(cls):
    REWARDS[cls.name] = cls
    return cls


def build_reward(name: str, **kwargs: Any) -> Reward:
    """A registered reward by name (kwargs go to its constructor, e.g. world=... for factuality)."""
    if name not in REWARDS:
        raise LmstackError(f"unknown reward {name!r}; choose one of {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs)


def score_batch(reward: Callable[[str, str, dict], float], prompts: list[str], completions: list[str],
                records: list[dict] | None = None) -> torch.Tensor:
    """(N,) float32 rewards for N samples; NaN where the reward does not apply."""
    if len(prompts) != len(completions) or (records is not None and len(records) != len(prompts)):
        raise LmstackError(f"score_batch needs as many prompts ({len(prompts)}) as completions ({len(completions)})"
                           + (f" and records ({len(records)})" if records is not None else ""))
    records = records or [{} for _ in prompts]
    return torch.tensor([reward(p, c, r) for p, c, r in zip(prompts, completions, records)], dtype=torch.float32)
