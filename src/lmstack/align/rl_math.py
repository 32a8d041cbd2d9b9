"""The arithmetic of online RL for language models: KL estimators and control, GAE, PPO objectives, group baselines.

All functions are pure tensor maths with masks, so the PPO / GRPO / RLOO loops stay short and each
piece is tested on hand-worked numbers. Shapes: per-token tensors are (B, T) with a 0/1 `mask` of
the generated tokens (right padding); per-sample tensors are (N,).

- KL estimators of KL(π || π_ref) from samples of π (Schulman, "Approximating KL divergence"),
  with log r = log π_ref(a) - log π(a):  k1 = -log r,  k2 = (log r)² / 2,  k3 = (r - 1) - log r.
  k1 is unbiased but can be negative per token; k3 is unbiased and never negative. These are statements about
  the *values*. Used as a loss and differentiated (GRPO's β term), k3's expected gradient is
  E_π[(1 - r) ∇log π] = -Σ π_ref ∇log π = ∇ KL(π_ref || π), the gradient of the reverse KL, not of KL(π || π_ref);
  k1 as a loss has expected gradient 0. Only as a (non-differentiated) reward does k1 give ∇ KL(π || π_ref).
- AdaptiveKLController (Ziegler et al. 2019): β ← β (1 + clip(KL/target - 1, ±0.2) · n_steps/horizon).
- kl_penalized_rewards: TRL's PPO reward: -β·KL on every token, plus the score on the last token.
- gae: generalised advantage estimation, A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} - V_t.
- whiten: (x - mean) / sqrt(var + 1e-8) over the masked entries.
- ppo_policy_loss / ppo_value_loss: the clipped surrogate objectives.
- group_advantages (GRPO: (r - mean_g) / (std_g + ε)) and rloo_advantages (r - mean of the *other*
  samples of the group). A NaN reward (a verifier that failed) is left out of its group's baseline,
  gets advantage 0 and valid=False, so it can neither poison its group nor the batch.

Usage:
    from lmstack.align.rl_math import kl_penalized_rewards, gae, whiten, ppo_policy_loss, group_advantages
    rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef=0.05, estimator="k3")
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    loss, stats = ppo_policy_loss(new_logps, logps, whiten(adv, mask), mask, clip=0.2)
    adv, valid = group_advantages(torch.tensor([1., 0., 1., 1.]), group_size=4)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lmstack.errors import LmstackError


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean over entries where mask is 1 (all entries when mask is None); 0 where nothing is counted."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected like TRL's masked_var when unbiased)."""
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) ** 2) * mask).sum() / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; shift_mean=False keeps the original mean.

    Masked-out entries come back as 0, so padding never leaks into a later sum."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


# ---- KL ---------------------------------------------------------------------------------------------
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    # value: an unbiased estimate of KL(π || π_ref); gradient (as a loss): that of KL(π_ref || π), see the docstring
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where the policy has barely moved


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}
"""name -> f(log π(a), log π_ref(a)) -> per-token KL estimate, for a sampled from π."""


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator not in KL_ESTIMATORS:
        raise LmstackError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps)


class FixedKLController:
    """A constant KL coefficient (TRL's default when adaptive control is off)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: raise β when the measured KL overshoots the target.

    The error is clipped to ±20% so one noisy batch cannot swing β wildly; horizon sets how many
    samples it takes to close the gap (β moves by a factor (1 + e · n_steps / horizon) per update)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise LmstackError(f"adaptive KL controller needs init_kl_coef >= 0, target > 0 and horizon > 0; got "
                               f"{init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): -kl_coef · KL_t on every generated token, plus the sequence's score
    on its last generated token (TRL's PPO). Returns (rewards, per-token KL), both 0 off the mask."""
    mask = mask.to(logps.dtype)
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    has = mask.sum(-1) > 0
    # the last generated token's index, wherever the completion starts (after a prompt, or at 0)
    last = mask.shape[-1] - 1 - (mask > 0).long().flip(-1).argmax(-1)
    # A row with no generated token has nowhere to put its score: it contributes nothing.
    rewards[torch.arange(rewards.shape[0]), last] += torch.where(has, scores.to(rewards.dtype), 0.0)
    return rewards, kl


# ---- GAE and PPO ------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (both (B, T)), walking each row backwards.

    The value after a row's last generated token is 0 (the episode ends there), so padding never
    bootstraps into a real token. returns = advantages + values is the value head's target."""
    mask = mask.to(values.dtype)
    b, t = rewards.shape
    adv = torch.zeros_like(values)
    running = values.new_zeros(b)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] * mask[:, i + 1] if i + 1 < t else values.new_zeros(b)
        cont = mask[:, i + 1] if i + 1 < t else values.new_zeros(b)  # 0 after the last token: no carry-over
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        running = delta + gamma * lam * cont * running
        adv[:, i] = running * mask[:, i]
    return adv, (adv + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, -min(ρA, clip(ρ, 1-ε, 1+ε_high)A), averaged over generated tokens.

    ρ = exp(log π - log π_old). Stats: clipfrac (tokens where the clip bound was active) and
    approx_kl = mean((ρ - 1) - log ρ), the k3 estimate of KL(π_old || π) that PPO watches."""
    ratio = torch.exp(logps - old_logps)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        log_ratio = logps - old_logps
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
                 "ratio_mean": float(masked_mean(ratio, mask))}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 · mean(max((V - R)², (V_clipped - R)²)), V_clipped = V_old + clip(V - V_old, ±clip)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, {"vf_clipfrac": float(masked_mean((b > a).float(), mask))}


# ---- group baselines (GRPO, RLOO) -------------------------------------------------------------------
def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise LmstackError(f"rewards must be 1-D with a length divisible by group_size={group_size}; got shape "
                           f"{tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive samples.

    std is the unbiased sample std of the group's finite rewards (as torch.std, TRL's choice); with
    scale=False only the mean is removed (Dr. GRPO). NaN rewards are excluded from mean and std and get
    A = 0; a group with fewer than two finite rewards has no baseline and all its advantages are 0.
    Returns (advantages (N,), valid (N,) bool)."""
    r = _groups(rewards.float(), group_size)
    valid = torch.isfinite(r)
    n = valid.sum(-1, keepdim=True)
    filled = torch.where(valid, r, 0.0)
    mean = filled.sum(-1, keepdim=True) / n.clamp(min=1)
    var = (torch.where(valid, r - mean, 0.0) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    adv = filled - mean
    if scale:
        adv = adv / (var.sqrt() + eps)
    usable = valid & (n >= 2)
    return torch.where(usable, adv, 0.0).view(-1), usable.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: A_i = r_i - mean of the other finite rewards in i's group (leave-one-out baseline).

    Unbiased, since the baseline does not depend on sample i. NaN rewards are left out of every
    baseline and get A = 0; a sample with no finite peer gets A = 0 too. Returns (advantages, valid)."""
    r = _groups(rewards.float(), group_size)
    valid = torch.isfinite(r)
    filled = torch.where(valid, r, 0.0)
    total, n = filled.sum(-1, keepdim=True), valid.sum(-1, keepdim=True)
    peers = n - valid.long()
    baseline = (total - filled) / peers.clamp(min=1)
    usable = valid & (peers >= 1)
    return torch.where(usable, filled - baseline, 0.0).view(-1), usable.view(-1)


def group_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Mean finite reward, fraction of NaN rewards and fraction of groups whose rewards are all equal
    (no learning signal for GRPO/RLOO), for logging."""
    r = _groups(rewards.float(), group_size)
    valid = torch.isfinite(r)
    filled = torch.where(valid, r, torch.nan)
    spread = torch.nan_to_num(filled.nan_to_num(-math.inf).amax(-1) - filled.nan_to_num(math.inf).amin(-1),
                              nan=0.0, posinf=0.0, neginf=0.0)
    return {"reward_mean": float(r[valid].mean()) if bool(valid.any()) else float("nan"),
            "nan_fraction": float(1 - valid.float().mean()),
            "flat_group_fraction": float((spread == 0).float().mean())}
