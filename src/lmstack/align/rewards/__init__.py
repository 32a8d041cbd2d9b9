"""Rewards without a learned model: verifiable (math, format, instructions), factuality, safety, heuristics,
and their weighted mixture. Every reward is registered by name in REWARDS (see base.py).

Usage:
    from lmstack.align.rewards import build_reward, RewardMixture, group_normalize, score_batch
    math_reward = build_reward("math")
    mix = RewardMixture.from_weights({"math": 1.0, "safety": 0.5, "length": 0.1}, world=world)
"""
from lmstack.align.rewards.base import REWARDS, Reward, build_reward, register, score_batch
from lmstack.align.rewards.bias import BiasReward, sentiment
from lmstack.align.rewards.factuality import FactualityReward, extract_claims
from lmstack.align.rewards.heuristics import HelpfulnessReward, LengthReward
from lmstack.align.rewards.mixture import RewardMixture, group_normalize
from lmstack.align.rewards.safety import SafetyReward, refusal_rates
from lmstack.align.rewards.verifiable import FormatReward, InstructionReward, MathReward, target_answer

__all__ = ["REWARDS", "Reward", "build_reward", "register", "score_batch", "BiasReward", "sentiment",
           "FactualityReward", "extract_claims", "HelpfulnessReward", "LengthReward", "RewardMixture",
           "group_normalize", "SafetyReward", "refusal_rates", "FormatReward", "InstructionReward", "MathReward",
           "target_answer"]
