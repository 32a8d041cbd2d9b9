"""PPO-RLHF: a value head on the policy, a per-token KL penalty against the reference with an adaptive
controller, GAE, whitened advantages, clipped policy and value objectives (Ziegler et al. 2019; Ouyang et
al. 2022; TRL's PPO is the reference for the formulas and defaults).

One step:
  1. roll out group_size samples per prompt with the engine; score each with the reward (verifier or RM);
  2. one no-grad forward gives the rollout's log-probs π_old and values V_old; the reference gives π_ref;
  3. per-token rewards: -β·KL_t on every generated token (k1 = log π_old - log π_ref, or k3), plus the
     score on the last generated token (rl_math.kl_penalized_rewards);
  4. GAE(γ, λ) over those rewards and V_old gives advantages and returns; advantages are whitened over the
     batch's generated tokens;
  5. ppo_epochs passes of `minibatches` minibatches: clipped surrogate + vf_coef · clipped value loss;
  6. the adaptive controller moves β toward kl_target with the batch's mean per-sequence KL (k1 summed).

The value head sits on the policy's own trunk (one forward gives log-probs and values), as TRL's
AutoModelForCausalLMWithValueHead does; TRL's newer trainer keeps a separate critic initialised from the
reward model, which doubles memory and compute: on a CPU the shared trunk is the affordable choice, and
vf_coef keeps the value loss from dominating the trunk's gradient. The head is not part of the saved
policy: `save_model(trainer.policy, ...)` writes an ordinary model directory.

A sample whose score is NaN is masked out of every loss term (its tokens weigh nothing) and counted.

Prefer kl_estimator='k1' here (TRL's default). As a *reward* (no gradient flows through it) the k3 penalty
does not regularise: E_π[k3 ∇log π] = ∇KL(π||π_ref) + ∇E_π_ref[log π], so maximising -β·k3 minimises
KL(π||π_ref) - KL(π_ref||π) (up to a constant), which is flat to second order at π_ref and unbounded below
(tests/align/test_ppo.py checks this identity exactly). k1's extra term E_π[∇log π] is 0, so k1 is the
plain KL gradient. Measured from the speedrun SFT checkpoint (lr 1e-4, 24 steps): k1 kept KL to the SFT
model at ≤ 7.3 nats per reply while k3 ran away to 548 nats as the controller raised β to 2.9. (k3 is the
right choice as a *loss* term, which is how grpo.py uses it.)

Usage:
    from lmstack.align.ppo import PPOTrainer, plot_kl_per_step
    cfg = AlignConfig(method="ppo", kl_coef=0.05, kl_target=6.0, group_size=4, ppo_epochs=2, minibatches=2)
    trainer = PPOTrainer(policy, tok, cfg, reward_from_spec("math"))
    summary = trainer.fit(train_records, val_records, out_dir="runs/ppo")
    plot_kl_per_step({"ppo": summary["history"]}, "kl.png", target=cfg.kl_target)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmstack.align.online import OnlineTrainer
from lmstack.align.rl_math import (AdaptiveKLController, FixedKLController, gae, kl_penalized_rewards, masked_mean,
                                   ppo_policy_loss, ppo_value_loss, whiten)
from lmstack.align.rollout import to_batch
from lmstack.config import atomic_save_figure
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer


class ValueHead(nn.Module):
    """V(s_t) = w · h_t + b on the policy's final hidden states; starts at 0 so early returns dominate."""

    def __init__(self, d_model: int, device=None):
        super().__init__()
        self.proj = nn.Linear(d_model, 1, device=device)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def logps_and_values(policy: nn.Module, value_head: ValueHead, batch: dict[str, torch.Tensor],
                     temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """One forward: per-token log-probs (B, T-1) of the completion tokens (as logprobs.token_logprobs) and
    values (B, T-1), where values[:, t] is V of the state that emits token t + 1. Both are 0 off the completion.
    with_entropy=True also returns the policy's entropy (B, T-1) at each of those states (nearly free: the
    logits are already there)."""
    ids, comp = batch["input_ids"], batch["completion_mask"].bool()
    scored = torch.zeros_like(comp)
    scored[:, :-1] = comp[:, 1:]
    hidden = policy(ids, return_hidden=True)
    logits = policy.head(hidden[scored]).float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = ids[:, 1:][scored[:, :-1]]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    logps = logits.new_zeros(ids.shape[0], ids.shape[1] - 1)
    logps[scored[:, :-1]] = picked
    values = value_head(hidden[:, :-1]) * scored[:, :-1]
    if not with_entropy:
        return logps, values
    probs = torch.softmax(logits, -1)
    entropy = logps.new_zeros(logps.shape)
    entropy[scored[:, :-1]] = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
    return logps, values, entropy


class _PolicyAndValue(nn.Module):
    """The parameters the optimizer sees: the policy plus its value head (named so norms/biases get no decay)."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head


class PPOTrainer(OnlineTrainer):
    method = "ppo"

    def __init__(self, policy, tokenizer, cfg, reward, reference=None, log=print):
        if type(policy) is not Transformer:
            raise LmstackError(f"PPO puts a value head on an lmstack Transformer's hidden states; got "
                               f"{type(policy).__name__} (merge adapters or unwrap the model first)")
        super().__init__(policy, tokenizer, cfg, reward, reference, log)
        self.value_head = ValueHead(policy.config.d_model, device=self.device)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.kl_coef))

    def trainable_module(self) -> nn.Module:
        return _PolicyAndValue(self.policy, self.value_head)

    def prepare(self, records: list[dict], step: int) -> tuple[dict[str, float], dict | None]:
        """Steps 1-4 of the module docstring: roll out, score, KL-penalised per-token rewards, GAE.

        Returns (stats, prepared) with prepared = None when no sample was scored, else a dict of the batch,
        mask, old log-probs and values, advantages and returns (TRPO reuses all of it)."""
        cfg = self.cfg
        ro = self.rollout(records, step)
        scores = ro.score(self.reward)
        valid = torch.isfinite(scores)
        stats = {"reward_mean": float(scores[valid].mean()) if bool(valid.any()) else float("nan"),
                 "nan_fraction": float(1 - valid.float().mean()), "completion_tokens": ro.mean_length(),
                 "finished": sum(ro.finished) / len(ro), "kl_coef": self.kl_ctl.value}
        stats.update(self.reward_parts(ro))
        if not bool(valid.any()):
            stats["skipped"] = 1.0  # nothing scored: no signal at all
            return stats, None
        batch = to_batch(ro, self.tok, self.device)
        mask = batch["completion_mask"][:, 1:].float() * valid.to(self.device, torch.float32)[:, None]
        with torch.no_grad():
            old_logps, old_values, entropy = logps_and_values(self.policy, self.value_head, batch, cfg.temperature,
                                                              with_entropy=True)
            ref = self.ref_logps(batch) if cfg.kl_coef else old_logps
            rewards, kl = kl_penalized_rewards(torch.nan_to_num(scores, 0.0).to(self.device), old_logps, ref, mask,
                                               self.kl_ctl.value, cfg.kl_estimator)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, mask) * mask
            seq_kl = ((old_logps - ref) * mask).sum(-1)[valid.to(self.device)]  # k1 summed per sequence
        stats["kl"] = float(seq_kl.mean())
        stats["entropy"] = float(masked_mean(entropy, mask))
        stats["nan_count"] = float((~valid).sum())
        stats["kl_penalty"] = float((kl.sum(-1) * self.kl_ctl.value)[valid.to(self.device)].mean())
        return stats, {"n": len(ro), "batch": batch, "mask": mask, "old_logps": old_logps, "old_values": old_values,
                       "adv": adv, "returns": returns}

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        cfg = self.cfg
        stats, prep = self.prepare(records, step)
        if prep is None:
            return stats
        batch, mask, old_logps, old_values = prep["batch"], prep["mask"], prep["old_logps"], prep["old_values"]
        adv, returns, ro_n = prep["adv"], prep["returns"], prep["n"]
        sums: dict[str, float] = {}
        n = 0
        for idx, sub in self.minibatches(batch, ro_n, step):
            m = mask[idx]
            if not bool(m.any()):
                continue  # every sample of this minibatch was unscored
            logps, values = logps_and_values(self.policy, self.value_head, sub, cfg.temperature)
            pl, st = ppo_policy_loss(logps, old_logps[idx], adv[idx], m, cfg.clip)
            vl, vst = ppo_value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
            loss = pl + cfg.vf_coef * vl
            st.update(vst, policy_loss=float(pl.detach()), value_loss=float(vl.detach()))
            st.update(self.stepper.step(loss, self.opt_steps))
            self.opt_steps += 1
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        stats.update({k: v / max(n, 1) for k, v in sums.items()})
        stats["value_mean"] = float(masked_mean(old_values, mask))
        self.kl_ctl.update(stats["kl"], ro_n)
        return stats


KL_LABELS = {"kl": "KL(π || π_ref) per reply (nats)", "approx_kl": "KL(π_old || π) per token"}


def plot_kl_per_step(histories: dict[str, list[dict]], path: str | Path, target: float | None = None,
                     keys: tuple[str, ...] = ("kl", "approx_kl"), log_scale: bool = True) -> Path:
    """Per-step KL of one or more runs from their fit() histories, one panel per key: KL to the reference
    (nats per reply, with the controller's target as a dashed line) and PPO's policy-vs-old approx_kl of the
    updates. A log y-axis keeps a runaway run and the target readable on one plot. Written atomically."""
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 2.8 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for name, hist in histories.items():
            # log scale: the first step's KL to the reference is exactly 0 (nothing has moved yet)
            pts = [(h["step"], h[key]) for h in hist if key in h and (not log_scale or h[key] > 0)]
            if pts:
                ax.plot(*zip(*pts), label=name, marker=".", linewidth=1)
        if target and key == "kl":
            ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
        if log_scale and ax.lines:
            ax.set_yscale("log")
        ax.set_ylabel(KL_LABELS.get(key, key))
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("RL step")
    fig.tight_layout()
    return atomic_save_figure(fig, path)
