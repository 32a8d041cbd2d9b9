"""One string names the reward an online run optimises: a registered reward, a weighted mix, or a reward model.

    "math"                  the math verifier (1 when the final `#### n` is right)
    "math=1,format=0.2"     a RewardMixture with those weights (components that do not apply are left out)
    "runs/rm/model"         a reward model directory written by `lmstack align --method rm`

Usage:
    from lmstack.align.rewards.spec import reward_from_spec
    reward = reward_from_spec("math=1,format=0.2")
    reward("2 + 3?", "2 + 3 = 5\\n#### 5", {"answer": 5})      # 1.0
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.align.rewards.base import REWARDS, Reward, build_reward
from lmstack.errors import LmstackError


def reward_from_spec(spec: str, world: Any = None, device: str = "cpu") -> Reward:
    """The reward a spec string names (see the module docstring); world= goes to rewards that need it."""
    import inspect

    spec = (spec or "").strip()
    if not spec:
        raise LmstackError("reward is empty; name a reward (e.g. 'math'), a mix ('math=1,format=0.2') or a "
                           "reward model directory")
    if Path(spec).is_dir():
        from lmstack.align.reward_model import RewardModelScorer, load_reward_model

        rm, tok = load_reward_model(spec, device=device)
        return RewardModelScorer(rm, tok)
    if "=" in spec or "," in spec:
        from lmstack.align.rewards.mixture import RewardMixture

        weights = {}
        for part in spec.split(","):
            name, _, weight = part.partition("=")
            try:
                weights[name.strip()] = float(weight) if weight.strip() else 1.0
            except ValueError:
                raise LmstackError(f"reward mix {spec!r}: weight {weight!r} of {name.strip()!r} is not a number") from None
        return RewardMixture.from_weights(weights, world=world)
    if spec not in REWARDS:
        raise LmstackError(f"reward {spec!r} is neither a registered reward ({', '.join(sorted(REWARDS))}), a mix "
                           "like 'math=1,format=0.2', nor a reward model directory")
    kwargs = {"world": world} if "world" in inspect.signature(REWARDS[spec]).parameters else {}
    return build_reward(spec, **kwargs)
