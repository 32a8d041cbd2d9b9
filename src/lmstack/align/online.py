"""What every online method shares: the policy, its frozen reference, the reward, prompt batches, held-out
evaluation, metrics and the loop. GRPO/RLOO (grpo.py), PPO (ppo.py) and rejection sampling (rft.py) each
write only their `train_step`.

One RL step = sample prompts_per_step prompts, roll each out group_size times with the engine, score the
samples, and update the policy from them. The reference (for the KL term) is a frozen copy of the starting
policy, or the policy itself with its adapters disabled when only LoRA weights train (reference='adapters');
with kl_coef=0 no reference is kept at all.

What the reward is made of is logged too, so that reward over-optimisation shows: each component of a mixture
(e.g. the math verifier and a reward model in --reward math=1,rm:DIR=0.5) and each cfg.monitor reward (scored,
never optimised) becomes score_<name> in every step's statistics, in metrics.jsonl and in the held-out
evaluations, and fit() plots them per step into out_dir/reward_scores.png.

Usage (subclasses do this; see grpo.py):
    trainer = GroupTrainer(policy, tok, cfg, reward)
    summary = trainer.fit(train_records, eval_records, out_dir="runs/grpo")
    summary["eval_before"]["mean"], summary["eval_after"]["mean"]      # held-out greedy reward (accuracy)
"""
from __future__ import annotations

import abc
import contextlib
import copy
from pathlib import Path
import random
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmstack.align.config import AlignConfig
from lmstack.align.dpo import adapters_disabled
from lmstack.align.logprobs import check_same_vocab, token_logprobs
from lmstack.align.rewards.spec import RM_PREFIX, reward_from_spec
from lmstack.align.rollout import Rollout, mean_stderr, sample
from lmstack.align.steps import Stepper
from lmstack.config import atomic_save_figure
from lmstack.errors import LmstackError
from lmstack.progress import BudgetBar
from lmstack.runtime.device import resolve_device
from lmstack.train.metrics import MetricsLogger


def prompt_stream(records: Sequence[dict], size: int, seed: int) -> Iterator[list[dict]]:
    """Endless batches of `size` records: shuffled epochs, reshuffled each pass (seeded)."""
    if not records:
        raise LmstackError("no training prompts")
    rng, order = random.Random(seed), []
    while True:
        batch = []
        while len(batch) < size:
            if not order:
                order = list(range(len(records)))
                rng.shuffle(order)
            batch.append(records[order.pop()])
        yield batch


class OnlineTrainer(abc.ABC):
    """Base class: subclasses implement train_step(records, step) -> dict of floats."""

    method = "online"

    def __init__(self, policy: nn.Module, tokenizer, cfg: AlignConfig, reward: Callable[[str, str, dict], float],
                 reference: nn.Module | None = None, log: Callable[[str], None] = print):
        self.cfg, self.tok, self.reward, self.log = cfg, tokenizer, reward, log
        self.device = resolve_device(cfg.train.device)
        self.policy = policy.to(self.device)
        self.reference = None
        if cfg.kl_coef > 0 and cfg.reference != "adapters":
            self.reference = copy.deepcopy(policy) if reference is None else reference.to(self.device)
            check_same_vocab(self.policy, self.reference)
            self.reference.eval().requires_grad_(False)
        self.opt_steps = 0
        self.monitors = monitor_rewards(cfg.monitor, str(self.device))

    # ---- pieces subclasses use ------------------------------------------------------------------------
    def rollout(self, records: Sequence[dict], step: int, n: int | None = None) -> Rollout:
        cfg = self.cfg
        return sample(self.policy, self.tok, records, n=n or cfg.group_size, max_new_tokens=cfg.max_tokens,
                      temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.train.seed * 1_000_003 + step,
                      template=cfg.template)

    def reward_parts(self, ro: Rollout, with_stderr: bool = False) -> dict[str, float]:
        """score_<name>: the mean over the rollout of each mixture component and each monitor reward (NaN where a
        judge does not apply is left out), with score_<name>_stderr and _n when asked."""
        columns: dict[str, list[float]] = {}
        if hasattr(self.reward, "components"):
            for p, c, r in zip(ro.prompts, ro.texts, ro.records):
                for k, v in self.reward.components(p, c, r).items():
                    columns.setdefault(k, []).append(float(v))
        for name, reward in self.monitors.items():
            columns[name] = ro.score(reward).tolist()
        out = {}
        for k, vals in columns.items():
            mean, se, n = mean_stderr(torch.tensor(vals, dtype=torch.float64))
            out[f"score_{k}"] = mean
            if with_stderr:
                out[f"score_{k}_stderr"], out[f"score_{k}_n"] = se, float(n)
        return out

    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1) per-token log-probs of the completions under the policy at the rollout temperature."""
        return token_logprobs(self.policy, batch, self.cfg.temperature)

    @torch.no_grad()
    def ref_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.reference == "adapters":
            ctx = adapters_disabled(self.policy)
            model = self.policy
        else:
            if self.reference is None:
                raise LmstackError("this run keeps no reference model (kl_coef=0)")
            ctx, model = contextlib.nullcontext(), self.reference
        with ctx:
            return token_logprobs(model, batch, self.cfg.temperature)

    def trainable_module(self) -> nn.Module:
        """What the optimizer updates (PPO adds its value head)."""
        return self.policy

    def optimizer_steps_per_rl_step(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.minibatches

    def minibatch_indices(self, n: int, step: int) -> list[torch.Tensor]:
        """cfg.minibatches random, nearly equal index sets covering 0..n-1 (seeded by the step)."""
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)
        perm = torch.randperm(n, generator=g)
        return [part for part in perm.chunk(min(self.cfg.minibatches, n)) if part.numel()]

    def minibatches(self, batch: dict[str, torch.Tensor], n: int, step: int) -> Iterator[tuple[torch.Tensor, dict]]:
        """(indices, sub-batch) for every minibatch of every PPO epoch over a rollout batch of n samples."""
        for epoch in range(self.cfg.ppo_epochs):
            for idx in self.minibatch_indices(n, step * self.cfg.ppo_epochs + epoch):
                idx = idx.to(self.device)
                yield idx, {k: v[idx] for k, v in batch.items() if k != "n_truncated"}

    @abc.abstractmethod
    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        """Roll out `records`, score, update the policy; return the step's statistics (reward_mean, ...)."""

    def evaluate(self, records: Sequence[dict]) -> dict[str, float]:
        """Greedy held-out reward (accuracy for a 0/1 verifier) on the first eval_prompts records."""
        if not records or not self.cfg.eval_prompts:
            return {}
        ro = sample(self.policy, self.tok, list(records)[:self.cfg.eval_prompts], n=1,
                    max_new_tokens=self.cfg.max_tokens, temperature=0.0, template=self.cfg.template)
        mean, se, n = mean_stderr(ro.score(self.reward))
        return {"mean": mean, "stderr": se, "n": n, "mean_length": ro.mean_length(),
                **self.reward_parts(ro, with_stderr=True)}

    # ---- the loop ---------------------------------------------------------------------------------------
    def fit(self, train: Sequence[dict], val: Sequence[dict] = (), out_dir: str | Path | None = None,
            on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """cfg.train.steps RL steps over prompt batches of `train`; greedy evaluation on `val` before, every
        eval_every steps and after. Returns a summary (eval_before/after, history, seconds)."""

        cfg = self.cfg
        self.stepper = Stepper.from_config(self.trainable_module(), cfg,
                                           cfg.train.steps * self.optimizer_steps_per_rl_step())
        metrics = MetricsLogger(out_dir, log=cfg.log, model=self.policy) if out_dir else None
        before = self.evaluate(val)
        if before:
            self.log(f"{self.method}: held-out reward before {before['mean']:.3f} ± {before['stderr']:.3f} "
                     f"(n={before['n']})")
        bar = None
        if cfg.train.progress:  # total and ETA follow whichever of steps / max_seconds ends the run

            bar = BudgetBar(cfg.train.steps, max_seconds=cfg.train.max_seconds, desc=self.method)
        history, evals, start = [], [], time.perf_counter()
        done = 0
        for step, records in zip(range(cfg.train.steps), prompt_stream(train, cfg.prompts_per_step, cfg.train.seed)):
            if cfg.train.max_seconds and time.perf_counter() - start > cfg.train.max_seconds:
                self.log(f"{self.method}: time budget of {cfg.train.max_seconds:.0f} s reached after {step} steps")
                break
            done = step + 1
            self.policy.train()
            t0 = time.perf_counter()
            row = self.train_step(records, step)
            row["seconds"] = time.perf_counter() - t0
            history.append({"step": step + 1, **row})
            if metrics and ((step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps):
                metrics.log(step + 1, row)
            every = cfg.train.eval_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps and val:
                ev = self.evaluate(val)
                evals.append({"step": step + 1, **ev})
                if metrics:
                    metrics.log(step + 1, {f"val_{k}": v for k, v in ev.items()})
            if on_step is not None:
                on_step(step + 1, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.2f}")
        if bar is not None:
            bar.close()
        after = self.evaluate(val)
        if after:
            evals.append({"step": done, **after})
            self.log(f"{self.method}: held-out reward after {after['mean']:.3f} ± {after['stderr']:.3f}")
        if metrics:
            if after:
                metrics.log(done, {f"val_{k}": v for k, v in after.items()})
            metrics.close()
        if out_dir and any(k.startswith("score_") for h in history for k in h):
            plot_reward_scores(history, ([{"step": 0, **before}] if before else []) + evals,
                               Path(out_dir) / "reward_scores.png")
        return {"method": self.method, "steps": done, "optimizer_steps": self.opt_steps,
                "train_seconds": time.perf_counter() - start, "train_prompts": len(train), "eval_prompts": len(val),
                "eval_before": before, "eval_after": after, "evals": evals, "history": history}


def monitor_rewards(spec: str, device: str = "cpu") -> dict[str, Callable[[str, str, dict], float]]:
    """cfg.monitor ('math,rm:DIR') -> {name: reward}; a reward model is named rm (rm2, ... for more)."""

    out: dict[str, Callable[[str, str, dict], float]] = {}
    for name in [n.strip() for n in (spec or "").split(",") if n.strip()]:
        key = name
        if name.startswith(RM_PREFIX):
            key = "rm" if "rm" not in out else f"rm{len(out) + 1}"
        out[key] = reward_from_spec(name, device=device)
    return out


def plot_reward_scores(history: Sequence[dict], evals: Sequence[dict], path: str | Path) -> Path:
    """Each score_<name> per RL step (training rollouts, solid) and at each held-out evaluation (greedy,
    dashed markers): a reward model's score climbing while the verifier's stalls is over-optimisation.
    Written atomically."""
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib

    matplotlib.use("Agg")
    # lazy: heavy (matplotlib), which this module does not import at its top
    import matplotlib.pyplot as plt

    keys = ["reward_mean"] + sorted({k for h in history for k in h if k.startswith("score_")})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key in keys:
        label, eval_key = ("optimised reward", "mean") if key == "reward_mean" else (key[6:], key)
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] == h[key]]
        if pts:
            line, = ax.plot(*zip(*pts), label=f"{label} (rollouts)", linewidth=1)
            ev = [(e["step"], e[eval_key]) for e in evals if eval_key in e and e[eval_key] == e[eval_key]]
            if ev:
                ax.plot(*zip(*ev), linestyle="--", marker="o", color=line.get_color(), label=f"{label} (held-out)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path)
