"""Preference losses on log-probabilities: DPO (sigmoid), cDPO, robust DPO, IPO, KTO, and the Bradley-Terry RM loss.

Every paired loss works on the implicit reward margin
    Δ = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))
and returns one loss per pair; the trainer averages them (optionally weighted per pair):
    dpo     -log σ(βΔ)                                          (Rafailov et al.; TRL loss_type="sigmoid", β=0.1)
    cdpo    -(1-ε) log σ(βΔ) - ε log σ(-βΔ)                    (conservative DPO: labels flipped with prob. ε)
    robust  [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε)          (Chowdhury et al.: unbiased under label noise)
    ipo     (Δ - 1/(2β))²                                      (Azar et al.; TRL feeds it length-averaged log-probs)
ε may be one number or one per pair (a pair's doubt: ε = 1 - confidence). Per-pair confidence can
also weight the pairs instead (`weighted_mean`).

KTO (Ethayarajh et al.) is unpaired: each completion is desirable or not, and its log-ratio
r = log π(y|x) - log π_ref(y|x) is compared with a reference point z0, a batch estimate of
KL(π || π_ref) taken on mismatched (prompt, completion) pairs, clamped at 0 and not differentiated:
    desirable    λ_D (1 - σ(β (r - z0)))
    undesirable  λ_U (1 - σ(β (z0 - r)))

The reward model loss (Bradley-Terry, TRL's RewardTrainer) on scalar rewards:
    -log σ(r_c - r_r - m) + c · mean((r_c + r_r)²)
with an optional per-pair margin m and a centering coefficient c that pins rewards near zero mean.

Usage:
    from lmstack.align.losses import PAIR_LOSSES, preference_loss, kto_loss, bradley_terry_loss
    out = preference_loss("dpo", pol_c, pol_r, ref_c, ref_r, beta=0.1)
    out["loss"].backward(); out["chosen_rewards"], out["margins"], out["accuracy"]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError

Smoothing = float | torch.Tensor


def dpo_sigmoid(delta: torch.Tensor, beta: float, eps: Smoothing = 0.0) -> torch.Tensor:
    """-log σ(βΔ), or with eps > 0 the cDPO mixture (the same function: cDPO is DPO with label smoothing)."""
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def cdpo(delta: torch.Tensor, beta: float, eps: Smoothing = 0.0) -> torch.Tensor:
    """Conservative DPO: the label smoothing ε must be in (0, 0.5); ε = 0 would silently be plain DPO."""
    _check_eps(eps, "cdpo", low_open=True)
    return dpo_sigmoid(delta, beta, eps)


def robust_dpo(delta: torch.Tensor, beta: float, eps: Smoothing = 0.0) -> torch.Tensor:
    """Robust DPO: unbiased estimate of the clean-label loss when labels flip with probability ε < 0.5."""
    _check_eps(eps, "robust")
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def ipo(delta: torch.Tensor, beta: float, eps: Smoothing = 0.0) -> torch.Tensor:
    """IPO: regress the margin onto 1/(2β) instead of pushing it to infinity (ε is ignored)."""
    return (delta - 1 / (2 * beta)) ** 2


def _check_eps(eps: Smoothing, name: str, low_open: bool = False) -> None:
    lo = float(eps.min()) if torch.is_tensor(eps) else float(eps)
    hi = float(eps.max()) if torch.is_tensor(eps) else float(eps)
    if hi >= 0.5 or lo < 0 or (low_open and hi <= 0):
        raise LmstackError(f"loss {name!r} needs label_smoothing in {'(0' if low_open else '[0'}, 0.5), got "
                           f"{lo if lo < 0 else hi}")


PAIR_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "dpo": dpo_sigmoid, "cdpo": cdpo, "robust": robust_dpo, "ipo": ipo,
}
"""name -> f(delta (N,), beta, eps) -> per-pair losses (N,)."""


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-item losses; with weights (e.g. per-pair confidences) Σ w·l / Σ w."""
    if weights is None:
        return losses.mean()
    weights = weights.to(losses)
    if weights.shape != losses.shape:
        raise LmstackError(f"weights of shape {tuple(weights.shape)} do not match losses {tuple(losses.shape)}")
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise LmstackError("per-pair weights must be >= 0 and not all zero")
    return (weights * losses).sum() / weights.sum()


def preference_loss(name: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
                    label_smoothing: Smoothing = 0.0, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One paired loss from sequence log-probs (all (N,)), plus what DPO trainers log.

    chosen/rejected rewards are the implicit rewards β(log π - log π_ref) (detached); accuracy is the
    fraction of pairs whose chosen reward is higher."""
    if name not in PAIR_LOSSES:
        raise LmstackError(f"unknown preference loss {name!r}; choose one of {', '.join(PAIR_LOSSES)}")
    if beta <= 0:
        raise LmstackError(f"beta={beta} must be > 0")
    chosen_lr = policy_chosen - ref_chosen
    rejected_lr = policy_rejected - ref_rejected
    losses = PAIR_LOSSES[name](chosen_lr - rejected_lr, beta, label_smoothing)
    chosen_rewards, rejected_rewards = beta * chosen_lr.detach(), beta * rejected_lr.detach()
    return {"loss": weighted_mean(losses, weights), "losses": losses, "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards, "margins": chosen_rewards - rejected_rewards,
            "accuracy": (chosen_rewards > rejected_rewards).float().mean()}


def kto_reference_point(kl_policy: torch.Tensor, kl_ref: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x))) over mismatched pairs, detached (KTO's KL estimate)."""
    if kl_policy.numel() == 0:
        return kl_policy.new_zeros(())
    return (kl_policy - kl_ref).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_policy: torch.Tensor, kl_ref: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """KTO on unpaired completions: policy_logps/ref_logps/desirable are (N,); kl_* are the mismatched pairs' (M,)."""
    if beta <= 0:
        raise LmstackError(f"beta={beta} must be > 0")
    desirable = desirable.bool()
    z0 = kto_reference_point(kl_policy, kl_ref)
    ratio = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(desirable, good, bad)
    rewards = beta * ratio.detach()
    # "accuracy": a desirable completion's reward above the reference point, an undesirable one's below
    right = torch.where(desirable, rewards > beta * z0, rewards < beta * z0)
    return {"loss": losses.mean(), "losses": losses, "kl": z0, "rewards": rewards,
            "chosen_rewards": rewards[desirable], "rejected_rewards": rewards[~desirable],
            "accuracy": right.float().mean()}


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float = 0.0, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Reward-model loss on scalar rewards (N,): -log σ(r_c - r_r - margin) + center_coef · mean((r_c + r_r)²)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    loss = weighted_mean(losses, weights)
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return {"loss": loss, "losses": losses, "accuracy": (chosen > rejected).float().mean(),
            "margins": (chosen - rejected).detach()}
