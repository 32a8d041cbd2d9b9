"""PPO's trust region, measured: clip + adaptive KL controller vs the same PPO with neither, from the speedrun's
SFT checkpoint on arithmetic with the math verifier.

Both runs reuse every rollout for 4 epochs x 4 minibatches (16 optimizer steps per rollout, so updates go
off-policy and the clip has something to do) at the same learning rate, steps and seeds:
  constrained    clip 0.2, per-token k1 KL penalty in the reward with an adaptive controller steering the
                 per-reply KL toward kl_target
  unconstrained  clip 0.99 (the loosest the config allows) and a negligible KL weight (1e-9: it only keeps a
                 reference so the same KL can be measured)
Reported per RL step: KL(π || π_SFT) summed over each reply (k1, mean over the step's 32 replies, measured on
the rollout before the step's updates) and PPO's approx_kl of the updates (policy vs the rollout policy).
Writes benchmarks/results/ppo_trust_region.{json,png}: the metric is the largest per-step KL to the reference
(lower is better; baseline = the unconstrained run), with the share of steps over the target, and the held-out
(val split, 128 prompts) greedy arithmetic accuracy of the constrained run before and after, with stderr.

Usage:
    python benchmarks/ppo_trust_region.py                      # ~5.5 min on 1 thread
    python benchmarks/ppo_trust_region.py --run runs/20261128-190000 --steps 24 --lr 1e-4
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import RESULTS, result, write_result

from lmstack.stages.align import _data
from lmstack.align.config import AlignConfig
from lmstack.align.ppo import PPOTrainer, plot_kl_per_step
from lmstack.align.rewards.verifiable import MathReward
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer

DEFAULT_RUN = "/tmp/speedrun_runs/20261128-174959"
SHAPE = dict(group_size=4, prompts_per_step=8, ppo_epochs=4, minibatches=4, temperature=0.7)


def run(name: str, sft: Path, tok, train, val, args, **kw) -> dict:
    cfg = AlignConfig(method="ppo", max_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts, **SHAPE, **kw,
                      train={"steps": args.steps, "eval_every": 0, "progress": True, "device": "cpu", "seed": 0},
                      optim={"lr": args.lr}, schedule={"warmup_steps": 2})
    summary = PPOTrainer(load_model(sft, lazy=False), tok, cfg, MathReward()).fit(train, val)
    hist = summary["history"]
    kls = [h["kl"] for h in hist if "kl" in h]
    upd = [h["approx_kl"] for h in hist if "approx_kl" in h]
    out = {"name": name, "history": hist, "kls": kls, "max_kl": max(kls), "mean_kl": sum(kls) / len(kls),
           "max_approx_kl": max(upd), "mean_approx_kl": sum(upd) / len(upd),
           "over_target": sum(k > args.kl_target for k in kls) / len(kls),
           "over_2x_target": sum(k > 2 * args.kl_target for k in kls) / len(kls),
           "reward_first5": sum(h["reward_mean"] for h in hist[:5]) / 5,
           "reward_last5": sum(h["reward_mean"] for h in hist[-5:]) / 5,
           "final_kl_coef": hist[-1]["kl_coef"], "eval_before": summary["eval_before"],
           "eval_after": summary["eval_after"]}
    print(f"{name}: KL to SFT max {out['max_kl']:.2f} mean {out['mean_kl']:.2f} nats/reply; steps over target "
          f"{out['over_target']:.0%} (over 2x target {out['over_2x_target']:.0%}); update approx_kl max "
          f"{out['max_approx_kl']:.4f}; train reward first-5 {out['reward_first5']:.3f} last-5 {out['reward_last5']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=DEFAULT_RUN, help="a speedrun run directory (holds sft/run/model and world/)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl_target", type=float, default=4.0, help="controller target, nats per reply")
    ap.add_argument("--kl_coef", type=float, default=0.2, help="the controller's starting β")
    ap.add_argument("--kl_horizon", type=int, default=64, help="controller horizon in samples (32 per step here)")
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--eval_prompts", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sft = Path(args.run) / "sft" / "run" / "model"
    if not (sft / "config.json").exists():
        raise SystemExit(f"no SFT checkpoint at {sft}; pass --run <speedrun run directory>")
    tok = load_tokenizer(sft)
    data = _data(Path(args.run) / "world", tok, load_model(sft).config.max_seq_len)
    train = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= 2]
    val = data["arithmetic_val"]  # never the test split: these settings were chosen by looking at runs
    a = run("clip 0.2 + adaptive KL", sft, tok, train, val, args, clip=0.2, kl_coef=args.kl_coef,
            kl_target=args.kl_target, kl_horizon=args.kl_horizon, kl_estimator="k1")
    b = run("no clip, no KL penalty", sft, tok, train, [], args, clip=0.99, kl_coef=1e-9)
    print("step  KL constrained  KL unconstrained  approx_kl constrained  approx_kl unconstrained  β")
    for ha, hb in zip(a["history"], b["history"]):
        print(f"{ha['step']:4d}  {ha['kl']:14.2f}  {hb['kl']:16.2f}  {ha.get('approx_kl', 0):21.4f}  "
              f"{hb.get('approx_kl', 0):23.4f}  {ha['kl_coef']:.3f}")
    png = plot_kl_per_step({a["name"]: a["history"], b["name"]: b["history"]}, RESULTS / "ppo_trust_region.png",
                           target=args.kl_target)
    common = dict(steps=args.steps, lr=args.lr, kl_target=args.kl_target, kl_coef_start=args.kl_coef,
                  kl_horizon=args.kl_horizon, max_new_tokens=args.max_new_tokens, **SHAPE, plot=png.name,
                  start="speedrun SFT checkpoint", task="arithmetic difficulty <= 2, math verifier")
    ev0, ev1 = a["eval_before"], a["eval_after"]
    base = "PPO without clip or KL penalty"
    rows = [
        result("ppo_trust_region", "max_per_step_kl_to_reference", False, round(a["max_kl"], 3), base,
               round(b["max_kl"], 3), mean_kl_ours=round(a["mean_kl"], 3), mean_kl_baseline=round(b["mean_kl"], 3),
               steps_over_target_ours=round(a["over_target"], 3), steps_over_target_baseline=round(b["over_target"], 3),
               steps_over_2x_target_ours=round(a["over_2x_target"], 3),
               steps_over_2x_target_baseline=round(b["over_2x_target"], 3), final_kl_coef=round(a["final_kl_coef"], 4),
               kl_per_step_ours=[round(k, 2) for k in a["kls"]], kl_per_step_baseline=[round(k, 2) for k in b["kls"]],
               **common),
        result("ppo_trust_region", "max_update_approx_kl", False, round(a["max_approx_kl"], 5), base,
               round(b["max_approx_kl"], 5), mean_approx_kl_ours=round(a["mean_approx_kl"], 5),
               mean_approx_kl_baseline=round(b["mean_approx_kl"], 5), **common),
        result("ppo_trust_region", "val_arithmetic_accuracy_after_ppo", True, round(ev1["mean"], 4), "SFT checkpoint",
               round(ev0["mean"], 4), stderr_after=round(ev1["stderr"], 4), stderr_before=round(ev0["stderr"], 4),
               n=ev1["n"], train_reward_first5_ours=round(a["reward_first5"], 3),
               train_reward_last5_ours=round(a["reward_last5"], 3),
               train_reward_last5_baseline=round(b["reward_last5"], 3), **common),
    ]
    write_result("ppo_trust_region", rows)


if __name__ == "__main__":
    main()
