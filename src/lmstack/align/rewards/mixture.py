"""Mixture of rewards (several judges with weights) and grouped normalisation of rewards within prompts.

A single proxy reward is easy to hack: a length reward pays a long wrong answer more than a short
right one. A mixture asks several independent judges (correctness, safety, helpfulness/length)
and combines them with weights:

    R = Σ_i w_i r_i / Σ_i w_i      over the components that apply to the record

A component that does not apply (the math verifier on a safety prompt) is left out of both sums,
so every prompt is judged on the same scale. A component that applies but returns NaN (it failed)
makes the mixture NaN, and the RL loop masks that sample out (rl_math.group_advantages).

Grouped feedback: rewards of several responses to the *same prompt* are only comparable with each
other, so `group_normalize` turns them into (r - mean_group) / (std_group + eps) per prompt.

Usage:
    from lmstack.align.rewards.mixture import RewardMixture, group_normalize
    mix = RewardMixture.from_weights({"math": 1.0, "safety": 0.5, "length": 0.2}, world=world)
    mix(prompt, completion, record)               # one number
    mix.components(prompt, completion, record)    # {"math": 1.0, "safety": 1.0, "length": 0.4}
    group_normalize(torch.tensor([1., 0., 3., 5.]), ["p1", "p1", "p2", "p2"])    # [0.71, -0.71, -0.71, 0.71]
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Hashable, Sequence

import torch

from lmstack.align.rewards.base import REWARDS, Reward, build_reward, register
from lmstack.align.rl_math import group_advantages
from lmstack.errors import LmstackError


@register
class RewardMixture(Reward):
    name = "mixture"

    def __init__(self, components: dict[str, tuple[Reward, float]] | None = None):
        if not components:
            raise LmstackError("a reward mixture needs at least one (reward, weight) component")
        for key, (reward, weight) in components.items():
            if not isinstance(reward, Reward) and not callable(reward):
                raise LmstackError(f"mixture component {key!r} is not a reward")
            if not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
                raise LmstackError(f"mixture weight for {key!r} must be a finite number >= 0, got {weight!r}")
        if sum(w for _, w in components.values()) <= 0:
            raise LmstackError("mixture weights are all zero")
        self.parts = dict(components)

    @classmethod
    def from_weights(cls, weights: dict[str, float], **kwargs: Any) -> "RewardMixture":
        """Build each named reward from the registry; kwargs (world=..., target_words=...) go to the rewards
        whose constructors take them."""

        parts = {}
        for name, w in weights.items():
            if name not in REWARDS:
                raise LmstackError(f"unknown reward {name!r} in mixture; choose from {', '.join(sorted(REWARDS))}")
            accepted = inspect.signature(REWARDS[name]).parameters
            parts[name] = (build_reward(name, **{k: v for k, v in kwargs.items() if k in accepted}), float(w))
        return cls(parts)

    def _applies(self, reward, record: dict) -> bool:
        return reward.applies(record) if isinstance(reward, Reward) else True

    def applies(self, record: dict) -> bool:
        return any(self._applies(r, record) and w > 0 for r, w in self.parts.values())

    def components(self, prompt: str, completion: str, record: dict | None = None) -> dict[str, float]:
        """Each component's reward (NaN where it does not apply)."""
        record = record or {}
        return {k: (float(r(prompt, completion, record)) if self._applies(r, record) else float("nan"))
                for k, (r, _) in self.parts.items()}

    def score(self, prompt: str, completion: str, record: dict) -> float:
        total = weight = 0.0
        for key, value in self.components(prompt, completion, record).items():
            reward, w = self.parts[key]
            if not self._applies(reward, record) or w == 0:
                continue
            if math.isnan(value):
                return float("nan")  # an applicable judge failed: no reward rather than a partial one
            total += w * value
            weight += w
        return total / weight


def group_normalize(rewards: torch.Tensor, groups: Sequence[Hashable], eps: float = 1e-4,
                    scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise rewards within groups given by any keys (e.g. the prompt text), in any order.

    Returns (normalised (N,), valid (N,)): NaN rewards and members of groups with fewer than two finite
    rewards get 0 and valid=False (see rl_math.group_advantages)."""
    if rewards.dim() != 1 or len(groups) != rewards.numel():
        raise LmstackError(f"group_normalize needs one group key per reward; got {len(groups)} keys for "
                           f"{rewards.numel()} rewards")
    out = torch.zeros_like(rewards, dtype=torch.float32)
    valid = torch.zeros(rewards.numel(), dtype=torch.bool)
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for members in index.values():
        idx = torch.tensor(members)
        adv, ok = group_advantages(rewards[idx], len(members), eps=eps, scale=scale)
        out[idx], valid[idx] = adv, ok
    return out, valid
