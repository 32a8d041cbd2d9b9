"""One string names the reward an online run optimises: a registered reward, a weighted mix, or a reward model.

    "math"                  the math verifier (1 when the final `#### n` is right)
    "math=1,format=0.2"     a RewardMixture with those weights (components that do not apply are left out)
    "runs/rm/model"         a reward model directory written by `lmstack align --method rm`
    "rm:runs/rm/model"      the same, said explicitly
    "math=1,rm:runs/rm/model=0.5"   a mixture with a reward model as one judge (its component is named "rm")

Usage:
    from lmstack.align.rewards.spec import reward_from_spec
    reward = reward_from_spec("math=1,format=0.2")
    reward("2 + 3?", "2 + 3 = 5\\n#### 5", {"answer": 5})      # 1.0
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lmstack.align.reward_model import RewardModelScorer, load_reward_model
from lmstack.align.rewards.base import REWARDS, Reward, build_reward
from lmstack.align.rewards.mixture import RewardMixture
from lmstack.errors import LmstackError


def reward_from_spec(spec: str, world: Any = None, device: str = "cpu") -> Reward:
    """The reward a spec string names (see the module docstring); world= goes to rewards that need it."""

    spec = (spec or "").strip()
    if not spec:
        raise LmstackError("reward is empty; name a reward (e.g. 'math'), a mix ('math=1,format=0.2') or a "
                           "reward model directory")
    if spec.startswith(RM_PREFIX) and "," not in spec and Path(spec[len(RM_PREFIX):]).is_dir():
        return reward_model_reward(spec[len(RM_PREFIX):], device)
    if Path(spec).is_dir():
        return reward_model_reward(spec, device)
    if "=" in spec or "," in spec:
        weights, models = {}, {}
        for part in spec.split(","):
            # rm:DIR=w: the weight follows the last '=' (a directory name may hold none, a weight always does)
            name, weight = part.rsplit("=", 1) if "=" in part else (part, "")
            name = name.strip()
            try:
                w = float(weight) if weight.strip() else 1.0
            except ValueError:
                raise LmstackError(f"reward mix {spec!r}: weight {weight!r} of {name!r} is not a number") from None
            if name.startswith(RM_PREFIX):
                key = "rm" if "rm" not in models else f"rm{len(models) + 1}"
                models[key] = (reward_model_reward(name[len(RM_PREFIX):], device), w)
            else:
                weights[name] = w
        parts = RewardMixture.from_weights(weights, world=world).parts if weights else {}
        return RewardMixture({**parts, **models})
    if spec not in REWARDS:
        raise LmstackError(f"reward {spec!r} is neither a registered reward ({', '.join(sorted(REWARDS))}), a mix "
                           "like 'math=1,format=0.2', nor a reward model directory")
    kwargs = {"world": world} if "world" in inspect.signature(REWARDS[spec]).parameters else {}
    return build_reward(spec, **kwargs)


RM_PREFIX = "rm:"


def reward_model_reward(path: str, device: str = "cpu") -> Reward:
    """A trained reward model directory (written by `lmstack align --method rm`) as a Reward."""

    if not Path(path).is_dir():
        raise LmstackError(f"reward model directory {path!r} does not exist (write one with "
                           "`lmstack align --method rm --out DIR`, then pass rm:DIR/model)")
    rm, tok = load_reward_model(path, device=device)
    return RewardModelScorer(rm.eval().requires_grad_(False), tok)  # a judge: no graph, no gradient
