"""GRPO and RLOO: policy gradients whose baseline is the other samples of the same prompt (no value model).

Each step samples G = group_size replies per prompt and scores them. The advantage of reply i is
    GRPO   A_i = (r_i - mean_group) / (std_group + eps)         (rl_math.group_advantages)
    RLOO   A_i = r_i - mean of the other G-1 rewards              (rl_math.rloo_advantages)
and every token of the reply shares it. The loss is PPO's clipped surrogate on the per-token ratio
π/π_old, averaged over all generated tokens of the batch (long and short replies weigh per token, as in
DAPO/TRL's token-level loss), plus kl_coef · k3 per token when kl_coef > 0 (GRPO's β). k3's *value* estimates
KL(π || π_ref) on samples of π, but differentiated as a loss term its expected gradient is
E_π[(1 - π_ref/π) ∇log π] = ∇ KL(π_ref || π): the term pulls toward the reverse KL (as in DeepSeek's GRPO).
With ppo_epochs=1 and minibatches=1 the update is exactly on-policy: π_old = π, the ratio is 1 and the
clip is inactive (TRL's default); more epochs or minibatches reuse each rollout and let the clip work.

A sample whose reward is NaN (the judge could not score it) is left out of its group's baseline and
of the loss; a group whose rewards are all equal carries no signal, and a step where every group is
flat (and no KL term) is skipped without touching the optimizer.

Usage:
    from lmstack.align.grpo import GroupTrainer
    cfg = AlignConfig(method="grpo", group_size=8, prompts_per_step=8, train={"steps": 40}, optim={"lr": 2e-5})
    trainer = GroupTrainer(policy, tok, cfg, reward_from_spec("math"))
    summary = trainer.fit(train_records, test_records, out_dir="runs/grpo")
"""
from __future__ import annotations

import torch

from lmstack.align.online import OnlineTrainer
from lmstack.align.rl_math import group_advantages, group_stats, kl_k3, masked_mean, ppo_policy_loss, rloo_advantages
from lmstack.align.rollout import to_batch

BASELINES = {"grpo": group_advantages, "rloo": rloo_advantages}


class GroupTrainer(OnlineTrainer):
    @property
    def method(self) -> str:
        return self.cfg.method if self.cfg.method in BASELINES else "grpo"

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        cfg = self.cfg
        ro = self.rollout(records, step)
        rewards = ro.score(self.reward)
        adv, valid = BASELINES[self.method](rewards, cfg.group_size)
        stats = {**group_stats(rewards, cfg.group_size), "completion_tokens": ro.mean_length(),
                 "finished": sum(ro.finished) / len(ro), **self.reward_parts(ro)}
        informative = valid & (adv != 0)
        stats["informative_fraction"] = float(informative.float().mean())
        if not bool(informative.any()) and not cfg.kl_coef:
            stats["skipped"] = 1.0  # every group flat: a zero gradient; AdamW momentum would still move weights
            return stats
        batch = to_batch(ro, self.tok, self.device)
        mask = batch["completion_mask"][:, 1:].float() * valid.to(self.device, torch.float32)[:, None]
        adv = adv.to(self.device)
        reuse = cfg.ppo_epochs > 1 or cfg.minibatches > 1
        old = None
        if reuse:
            with torch.no_grad():
                old = self.logps(batch)
        ref = self.ref_logps(batch) if cfg.kl_coef else None
        sums: dict[str, float] = {}
        n = 0
        for idx, sub in self.minibatches(batch, len(ro), step):
            logps = self.logps(sub)
            m = mask[idx]
            old_mb = old[idx] if old is not None else logps.detach()
            loss, st = ppo_policy_loss(logps, old_mb, adv[idx, None].expand_as(logps), m, cfg.clip)
            if ref is not None:
                kl = masked_mean(kl_k3(logps, ref[idx]), m)
                loss = loss + cfg.kl_coef * kl
                st["kl"] = float(kl.detach())
            st.update(self.stepper.step(loss, self.opt_steps))
            self.opt_steps += 1
            st["loss"] = float(loss.detach())
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        stats.update({k: v / n for k, v in sums.items()})
        return stats
