"""Rejection-sampling fine-tuning (RFT) in iterative rounds: expert iteration with a verifier or reward model.

One round:
    1. take the round's training prompts (`rft_prompts` of them, default 256, drawn from a seeded shuffle
       of the training set that carries on across rounds, so rounds see fresh prompts before repeats);
    2. sample group_size replies per prompt from the *current* policy (best-of-n);
    3. score them with the reward and keep, per prompt, the best reply when it scores >= rft_min_reward
       (ties go to the shortest reply: the same answer in fewer tokens is the better demonstration);
    4. fine-tune on the winners with the SFT loss, completion tokens only:
           loss = -mean over winner completion tokens of log π(token | prompt, earlier tokens)
       for cfg.train.steps optimizer steps of batch_size winners (an optimizer *step* count, not epochs, so a
       round costs the same whatever its yield; few winners are simply revisited more often). Each round
       gets a fresh AdamW and warmup/cosine schedule: it is a small SFT run on new data;
    5. evaluate greedily on the held-out prompts and record the metric.
A round without a single winner fine-tunes nothing (and logs that), rather than taking AdamW steps on no data.
Because round r+1 samples from round r's policy, this is the iterative RLHF loop (ReST / expert iteration)
with a verifier in place of human labels.

Usage:
    from lmstack.align.rft import RejectionSamplingTrainer
    cfg = AlignConfig(method="rft", rounds=3, group_size=8, batch_size=16, train={"steps": 30}, optim={"lr": 1e-4})
    summary = RejectionSamplingTrainer(policy, tok, cfg, reward_from_spec("math")).fit(train, val)
    for r in summary["rounds"]:
        print(r["round"], r["n_winners"], r["accept_rate"], r["eval_mean"], r["eval_stderr"])
"""
from __future__ import annotations

import math
from pathlib import Path
import time
from typing import Any, Callable, Sequence

import torch

from lmstack.align.logprobs import collate, token_logprobs
from lmstack.align.online import OnlineTrainer, prompt_stream
from lmstack.align.rollout import Rollout
from lmstack.align.steps import Stepper, batches, chunks
from lmstack.train.metrics import MetricsLogger


def select_winners(rewards: torch.Tensor, lengths: Sequence[int], n: int, min_reward: float) -> list[int]:
    """Indices of the winners among groups of n consecutive samples: per group the highest finite reward,
    if it is >= min_reward; among equal best rewards the shortest sample, then the earliest."""
    if rewards.numel() % n or len(lengths) != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards and {len(lengths)} lengths do not form groups of {n}")
    winners = []
    for g in range(rewards.numel() // n):
        best = None
        for i in range(g * n, (g + 1) * n):
            r = float(rewards[i])
            if not math.isfinite(r) or r < min_reward:
                continue
            if best is None or (r, -lengths[i]) > (float(rewards[best]), -lengths[best]):
                best = i
        if best is not None:
            winners.append(best)
    return winners


def sft_loss(policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-mean log-prob of the completion tokens of the batch (token-level mean, temperature 1)."""
    logps = token_logprobs(policy, batch)
    mask = batch["completion_mask"][:, 1:].float()
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


class RejectionSamplingTrainer(OnlineTrainer):
    method = "rft"

    def prompts_per_round(self, n_train: int) -> int:
        """Prompts sampled per round: cfg.rft_prompts (default 256), capped at the training set."""
        return max(1, min(n_train, self.cfg.rft_prompts))

    def collect(self, records: list[dict], round_: int) -> tuple[Rollout, torch.Tensor, list[int]]:
        """Best-of-n sampling from the current policy: (rollout, rewards, winner indices). Prompts go to the
        engine prompts_per_step at a time, so memory stays bounded however many prompts a round has."""
        cfg = self.cfg
        parts, rewards = [], []
        for j, part in enumerate(chunks(records, cfg.prompts_per_step)):
            ro = self.rollout(part, round_ * 100_003 + j)
            parts.append(ro)
            rewards.append(ro.score(self.reward))
        ro = Rollout([], [], [], [], [], [], cfg.group_size)
        for p in parts:
            for name in ("records", "prompts", "prompt_ids", "completion_ids", "texts", "finished"):
                getattr(ro, name).extend(getattr(p, name))
        r = torch.cat(rewards)
        return ro, r, select_winners(r, [len(c) for c in ro.completion_ids], cfg.group_size, cfg.rft_min_reward)

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        """One round on `records`: sample, select, fine-tune. `step` is the round index (0-based)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        ro, rewards, winners = self.collect(records, step)
        finite = rewards[torch.isfinite(rewards)]
        stats: dict[str, float] = {
            "n_prompts": float(len(records)), "n_samples": float(len(ro)), "n_winners": float(len(winners)),
            "accept_rate": len(winners) / max(1, len(records)),
            "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "completion_tokens": ro.mean_length(),
            "winner_tokens": sum(len(ro.completion_ids[i]) for i in winners) / max(1, len(winners)),
            "sample_seconds": time.perf_counter() - t0, "sft_steps": 0.0}
        if not winners:
            self.log(f"rft round {step + 1}: no sample scored >= rft_min_reward={cfg.rft_min_reward}; "
                     "no SFT step this round")
            stats["skipped"] = 1.0
            return stats
        rows = [(ro.prompt_ids[i], ro.completion_ids[i]) for i in winners]
        stepper = Stepper.from_config(self.policy, cfg)
        self.policy.train()
        losses = []
        for k, rows_k in zip(range(cfg.train.steps), batches(rows, cfg.batch_size, cfg.train.seed * 7919 + step)):
            batch = collate(rows_k, self.tok.pad_id, cfg.max_len, self.device)
            loss = sft_loss(self.policy, batch)
            stepper.step(loss, k)
            self.opt_steps += 1
            losses.append(float(loss.detach()))
        stats.update(sft_steps=float(len(losses)), sft_loss_first=losses[0], sft_loss_last=losses[-1])
        return stats

    def fit(self, train: Sequence[dict], val: Sequence[dict] = (), out_dir: str | Path | None = None,
            on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """cfg.rounds rounds; held-out greedy evaluation before and after every round. The summary keeps the
        online trainers' keys (eval_before, eval_after, evals, history) and adds `rounds`: one row per
        round with round, n_winners, accept_rate, eval_mean, eval_stderr (round 0 = before training)."""

        cfg = self.cfg
        metrics = MetricsLogger(out_dir, log=cfg.log, model=self.policy) if out_dir else None
        before = self.evaluate(val)
        rounds = [{"round": 0, "n_winners": 0, "accept_rate": float("nan"), "eval_mean": before.get("mean"),
                   "eval_stderr": before.get("stderr"), "eval_n": before.get("n")}] if before else []
        if before:
            self.log(f"rft: held-out reward before {before['mean']:.3f} ± {before['stderr']:.3f} (n={before['n']})")
        stream = prompt_stream(train, self.prompts_per_round(len(train)), cfg.train.seed)
        history, evals, start, done = [], [], time.perf_counter(), 0
        after: dict[str, float] = before
        for r in range(cfg.rounds):
            if cfg.train.max_seconds and time.perf_counter() - start > cfg.train.max_seconds:
                self.log(f"rft: time budget of {cfg.train.max_seconds:.0f} s reached after {r} rounds")
                break
            t0 = time.perf_counter()
            row = self.train_step(next(stream), r)
            row["seconds"] = time.perf_counter() - t0
            done = r + 1
            history.append({"step": done, **row})
            ev = self.evaluate(val)
            if ev:
                after = ev
                evals.append({"step": done, **ev})
            rounds.append({"round": done, "n_winners": int(row["n_winners"]), "accept_rate": row["accept_rate"],
                           "sample_reward_mean": row["reward_mean"], "sft_steps": int(row["sft_steps"]),
                           "eval_mean": ev.get("mean"), "eval_stderr": ev.get("stderr"), "eval_n": ev.get("n")})
            msg = f"rft round {done}: {int(row['n_winners'])}/{int(row['n_prompts'])} prompts won"
            if ev:
                msg += f"; held-out reward {ev['mean']:.3f} ± {ev['stderr']:.3f}"
            self.log(msg)
            if metrics:
                metrics.log(done, {**row, **{f"val_{k}": v for k, v in ev.items()}})
            if on_step is not None:
                on_step(done, row)
        if metrics:
            metrics.close()
        return {"method": self.method, "steps": done, "optimizer_steps": self.opt_steps,
                "train_seconds": time.perf_counter() - start, "train_prompts": len(train), "eval_prompts": len(val),
                "eval_before": before, "eval_after": after if evals else {}, "evals": evals, "history": history,
                "rounds": rounds}
