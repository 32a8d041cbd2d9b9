"""TRPO (Schulman et al. 2015): a natural-gradient policy step, sized by a KL trust region and checked by a
backtracking line search. `lmstack align --method trpo`.

PPO (ppo.py) approximates a trust region with a clipped ratio and a KL penalty; TRPO enforces one. Each RL step:
  1. roll out, score, KL-penalised per-token rewards, GAE, whitened advantages: exactly PPO's steps 1-4
     (PPOTrainer.prepare), so the two methods differ only in how the policy moves;
  2. the surrogate L(θ) = mean over generated tokens of (π_θ(a|s) / π_old(a|s)) · A, and its gradient g at θ_old
     (the ordinary policy gradient);
  3. the mean KL to the old policy, KL̄(θ) = mean over generated tokens of KL(π_old(·|s) || π_θ(·|s)), computed
     exactly over the whole vocabulary. Its Hessian at θ_old is the Fisher F of the policy; F·v comes from double
     backprop (the gradient of (∇KL̄ · v)), never forming F;
  4. conjugate gradient solves (F + damping·I) x = g in cg_iters products; the step s = sqrt(2·max_kl / xᵀFx) · x is
     the largest along x whose quadratic KL model equals max_kl;
  5. backtracking line search: try θ_old + 0.5^k · s for k = 0..line_search_steps-1 and accept the first that
     improves the surrogate *and* has a measured KL̄ <= max_kl; if none does, the policy stays at θ_old;
  6. the value head (the critic of step 1) regresses on the returns with Adam at `lr`, on the policy's
     detached features, so the critic's gradient never moves the policy outside the trust region.

On CPU, torch's fused attention kernel has no double backward, so TRPO's forwards run under the math SDPA kernel.

Usage:
    from lmstack.align.trpo import TRPOTrainer, conjugate_gradient
    cfg = AlignConfig(method="trpo", max_kl=0.01, cg_iters=10, kl_coef=0.05, group_size=4, optim={"lr": 1e-3})
    summary = TRPOTrainer(policy, tok, cfg, reward_from_spec("math")).fit(train_records, val_records)
    x = conjugate_gradient(lambda v: A @ v, b, iters=20)      # solves A x = b for a symmetric positive A
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from lmstack.align.ppo import PPOTrainer
from lmstack.align.rl_math import ppo_value_loss
from lmstack.errors import LmstackError

NEG = -1e4  # padded vocabulary rows may hold -inf logits: clamp so that 0 · (-inf) never turns a KL into NaN


def conjugate_gradient(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10,
                       tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """Solve A x = b for a symmetric positive definite A given only v -> A v. Returns (x, final residual norm).
    Exact in dim(b) iterations in exact arithmetic; stops early once the squared residual is below tol."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iters):
        if float(rr) < tol:
            break
        ap = avp(p)
        pap = torch.dot(p, ap)
        if float(pap) <= 0:
            raise LmstackError(f"conjugate gradient met a non-positive curvature pᵀAp = {float(pap):.3g}; the "
                               "matrix is not positive definite (raise cg_damping)")
        alpha = rr / pap
        x += alpha * p
        r -= alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, float(rr.sqrt())


def flat_grad(y: torch.Tensor, params: list[nn.Parameter], **kwargs) -> torch.Tensor:
    grads = torch.autograd.grad(y, params, allow_unused=True, **kwargs)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def set_flat(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()


def mean_kl(old_logp: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over rows of KL(old || new) with old given as log-probs (N, V) and new as logits (N, V)."""
    new_logp = torch.log_softmax(logits.clamp(min=NEG), -1)
    kl = (old_logp.exp() * (old_logp - new_logp)).sum(-1)
    return (kl * weight).sum() / weight.sum().clamp(min=1e-8)


def fisher_vector_product(kl: torch.Tensor, params: list[nn.Parameter], damping: float = 0.0
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (H + damping·I) v, H the Hessian of `kl` (a KL to a fixed distribution, at the point where it is 0:
    there H is the Fisher information). One backward with create_graph now, one double backward per product."""
    grad = flat_grad(kl, params, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        return flat_grad(torch.dot(grad, v), params, retain_graph=True) + damping * v

    return fvp


def math_attention():
    """The math SDPA kernel (composite ops, so double backward works); a no-op where torch lacks the switch."""
    try:
        # lazy: guarded: older torch lacks torch.nn.attention, the except falls back
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def completion_logits(policy: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) at the N states that emit a completion token, those tokens (N,), where they sit (B, T-1))."""
    ids, comp = batch["input_ids"], batch["completion_mask"].bool()
    where = comp[:, 1:]
    hidden = policy(ids, return_hidden=True)[:, :-1]
    logits = policy.head(hidden[where]).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits, ids[:, 1:][where], where


def surrogate(logits: torch.Tensor, targets: torch.Tensor, old_logp_taken: torch.Tensor, adv: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ratio · advantage over the completion tokens."""
    logp = torch.log_softmax(logits.clamp(min=NEG), -1).gather(-1, targets[:, None]).squeeze(-1)
    return (torch.exp(logp - old_logp_taken) * adv * weight).sum() / weight.sum().clamp(min=1e-8)


def trpo_update(policy: nn.Module, batch: dict[str, torch.Tensor], adv: torch.Tensor, mask: torch.Tensor,
                max_kl: float = 0.01, cg_iters: int = 10, damping: float = 0.1, line_search_steps: int = 10,
                temperature: float = 1.0) -> dict[str, float]:
    """One TRPO policy step on a batch (input_ids, completion_mask), per-token advantages (B, T-1) and a 0/1
    token mask (B, T-1). Moves the policy's trainable parameters in place. Returns statistics; `accepted` is 1
    when a step was taken, and then `kl` (measured) is <= max_kl."""
    if not max_kl > 0:
        raise LmstackError(f"max_kl must be > 0, got {max_kl}")
    params = [p for p in policy.parameters() if p.requires_grad]
    with math_attention():
        with torch.no_grad():
            old_logits, targets, where = completion_logits(policy, batch, temperature)
            old_logp = torch.log_softmax(old_logits.clamp(min=NEG), -1)
        weight = mask[where].float()
        a = adv[where].float()
        if not bool((weight > 0).any()):
            return {"accepted": 0.0, "kl": 0.0, "surrogate_gain": 0.0, "no_tokens": 1.0}
        old_taken = old_logp.gather(-1, targets[:, None]).squeeze(-1)
        logits, _, _ = completion_logits(policy, batch, temperature)
        surr = surrogate(logits, targets, old_taken, a, weight)
        g = flat_grad(surr, params, retain_graph=True)
        fvp = fisher_vector_product(mean_kl(old_logp, logits, weight), params, damping)
        x, residual = conjugate_gradient(fvp, g, cg_iters)
        xfx = float(torch.dot(x, fvp(x)))
        del fvp, logits
        old_flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        stats = {"g_norm": float(g.norm()), "cg_residual": residual, "accepted": 0.0, "kl": 0.0,
                 "surrogate_gain": 0.0, "backtracks": float(line_search_steps)}
        if not (xfx > 0 and math.isfinite(xfx)):
            return stats  # a zero gradient (all advantages 0): nothing to do
        full = math.sqrt(2 * max_kl / xfx) * x
        expected = float(torch.dot(g, full))
        surr_old = float(surr.detach())
        stats.update(expected_gain=expected, full_step_norm=float(full.norm()))
        for k in range(line_search_steps):
            frac = 0.5 ** k
            set_flat(params, old_flat + frac * full)
            with torch.no_grad():
                new_logits, _, _ = completion_logits(policy, batch, temperature)
                kl = float(mean_kl(old_logp, new_logits, weight))
                gain = float(surrogate(new_logits, targets, old_taken, a, weight)) - surr_old
            if kl <= max_kl and gain > 0:
                stats.update(accepted=1.0, kl=kl, surrogate_gain=gain, backtracks=float(k), step_fraction=frac)
                return stats
        set_flat(params, old_flat)  # no step passed both tests: stay at θ_old
        return stats


class TRPOTrainer(PPOTrainer):
    """PPO's rollouts and advantages, TRPO's policy step (trpo_update), and a critic trained apart."""

    method = "trpo"

    def trainable_module(self) -> nn.Module:
        return self.value_head  # the optimizer (at cfg.optim.lr) trains only the critic; the policy moves by TRPO

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        cfg = self.cfg
        stats, prep = self.prepare(records, step)
        if prep is None:
            return stats
        batch, mask = prep["batch"], prep["mask"]
        st = trpo_update(self.policy, batch, prep["adv"], mask, cfg.max_kl, cfg.cg_iters, cfg.cg_damping,
                         cfg.line_search_steps, cfg.temperature)
        stats.update({f"trpo_{k}" if k != "kl" else "step_kl": v for k, v in st.items()})
        # the critic: regress V on the returns from the (new) policy's detached features
        with torch.no_grad(), math_attention():
            hidden = self.policy(batch["input_ids"], return_hidden=True)[:, :-1]
        scored = batch["completion_mask"][:, 1:].float()
        sums: dict[str, float] = {}
        n = 0
        for idx, _ in self.minibatches(batch, prep["n"], step):
            m = mask[idx]
            if not bool(m.any()):
                continue
            values = self.value_head(hidden[idx]) * scored[idx]
            vl, vst = ppo_value_loss(values, prep["old_values"][idx], prep["returns"][idx], m, cfg.value_clip)
            vst.update(self.stepper.step(vl, self.opt_steps), value_loss=float(vl.detach()))
            self.opt_steps += 1
            for k, v in vst.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        stats.update({k: v / max(n, 1) for k, v in sums.items()})
        self.kl_ctl.update(stats["kl"], prep["n"])
        return stats
