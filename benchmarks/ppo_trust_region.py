"""PPO's trust region, measured: clip + adaptive KL controller vs the same PPO with neither, from the speedrun's
SFT checkpoint on arithmetic with the math verifier.

Both runs reuse every rollout for 4 epochs x 4 minibatches (so updates go off-policy and the clip can act)
at the same learning rate and seeds:
  constrained    clip 0.2, per-token KL penalty with an adaptive controller toward kl_target (nats/sequence)
  unconstrained  clip 0.99 (the loosest the config allows) and a negligible KL weight (1e-9: it only keeps a
                 reference so the same KL can be measured)
Reported per RL step: KL(π || π_SFT) summed over each reply (k1, mean over replies) and PPO's approx_kl of
the updates (policy vs the rollout policy). Writes benchmarks/results/ppo_trust_region.{json,png}; the
metric is the largest per-step KL to the reference (lower is better; baseline = unconstrained), plus the
held-out (val) arithmetic accuracy of the constrained run before and after.

Usage:
    python benchmarks/ppo_trust_region.py --run runs/20261128-190000      # ~8 min on 1 thread
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import RESULTS, result, write_result

from lmstack.align.align_stage import _data
from lmstack.align.config import AlignConfig
from lmstack.align.ppo import PPOTrainer, plot_kl_per_step
from lmstack.align.rewards.verifiable import MathReward
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer


def run(name: str, sft: Path, tok, train, val, args, **kw) -> dict:
    cfg = AlignConfig(method="ppo", lr=args.lr, steps=args.steps, group_size=4, prompts_per_step=8, temperature=0.7,
                      max_new_tokens=128, ppo_epochs=4, minibatches=4, warmup_steps=2, eval_prompts=args.eval_prompts,
                      eval_every=0, progress=True, device="cpu", seed=0, **kw)
    summary = PPOTrainer(load_model(sft, lazy=False), tok, cfg, MathReward()).fit(train, val)
    hist = summary["history"]
    kls = [h["kl"] for h in hist if "kl" in h]
    upd = [h["approx_kl"] for h in hist if "approx_kl" in h]
    out = {"name": name, "history": hist, "max_kl": max(kls), "mean_kl": sum(kls) / len(kls),
           "final_kl": sum(kls[-5:]) / len(kls[-5:]), "max_approx_kl": max(upd), "mean_approx_kl": sum(upd) / len(upd),
           "over_target": sum(k > args.kl_target for k in kls) / len(kls),
           "eval_before": summary["eval_before"], "eval_after": summary["eval_after"]}
    print(f"{name}: KL to SFT max {out['max_kl']:.2f} mean {out['mean_kl']:.2f} last-5 {out['final_kl']:.2f}; "
          f"steps over target {out['over_target']:.0%}; update approx_kl max {out['max_approx_kl']:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun run directory (holds sft/run/model and world/)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--kl_target", type=float, default=2.0)
    ap.add_argument("--eval_prompts", type=int, default=128)
    ap.add_argument("--kl_horizon", type=int, default=200, help="controller horizon in samples (32 per step here)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sft = Path(args.run) / "sft" / "run" / "model"
    tok = load_tokenizer(sft)
    data = _data(Path(args.run) / "world", tok, load_model(sft).config.max_seq_len)
    train = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= 2]
    val = data["arithmetic_val"]
    a = run("clip 0.2 + adaptive KL", sft, tok, train, val, args, clip=0.2, kl_coef=0.1, kl_target=args.kl_target,
            kl_horizon=args.kl_horizon)
    b = run("no clip, no KL penalty", sft, tok, train, [], args, clip=0.99, kl_coef=1e-9)
    png = plot_kl_per_step({a["name"]: a["history"], b["name"]: b["history"]}, RESULTS / "ppo_trust_region.png",
                           target=args.kl_target)
    plot_kl_per_step({a["name"]: a["history"], b["name"]: b["history"]}, RESULTS / "ppo_trust_region_updates.png",
                     key="approx_kl")
    common = dict(steps=args.steps, lr=args.lr, kl_target=args.kl_target, kl_horizon=args.kl_horizon, ppo_epochs=4, minibatches=4,
                  group_size=4, prompts_per_step=8, plot=png.name, start="speedrun SFT checkpoint",
                  task="arithmetic difficulty <= 2, math verifier")
    ev0, ev1 = a["eval_before"], a["eval_after"]
    rows = [
        result("ppo_trust_region", "max_per_step_kl_to_reference", False, round(a["max_kl"], 4),
               "PPO without clip or KL penalty", round(b["max_kl"], 4), mean_kl_ours=round(a["mean_kl"], 4),
               mean_kl_baseline=round(b["mean_kl"], 4), steps_over_target_ours=a["over_target"],
               steps_over_target_baseline=b["over_target"], **common),
        result("ppo_trust_region", "max_update_approx_kl", False, round(a["max_approx_kl"], 5),
               "PPO without clip or KL penalty", round(b["max_approx_kl"], 5), **common),
        result("ppo_trust_region", "val_arithmetic_accuracy_after_ppo", True, round(ev1["mean"], 4), "SFT checkpoint",
               round(ev0["mean"], 4), stderr_after=round(ev1["stderr"], 4), stderr_before=round(ev0["stderr"], 4),
               n=ev1["n"], **common),
    ]
    write_result("ppo_trust_region", rows)


if __name__ == "__main__":
    main()
