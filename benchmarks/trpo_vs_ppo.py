"""TRPO against PPO at equal rollouts, on world arithmetic with the math verifier, from the same SFT'd start.

Both runs use PPO's rollouts and advantages (the same samples per step, the same per-token k1 KL penalty to the
start model in the reward, GAE, whitened advantages, the same value head) and differ only in the policy update:
  ppo    4 epochs x 4 minibatches of the clipped surrogate (clip 0.2) with AdamW at lr 1e-4 (the project's
         measured PPO setting, benchmarks/ppo_trust_region.py)
  trpo   one natural-gradient step per rollout: conjugate gradient (10 Fisher-vector products) and a
         backtracking line search under max_kl = 0.01 mean per-token KL (Schulman et al.'s default)
Neither was tuned for this benchmark: one run each at its standard setting, and (--larger_steps) one run each at a
3x larger step, so both get the same budget of two settings.
Reported: training reward (first and last 5 steps), held-out greedy accuracy (val split, n prompts, stderr)
before and after, and KL to the start model per reply (k1 summed over the reply, on fresh samples): through
training (max over steps) and at the end (the final policy on 32 held-out prompts x group_size samples).
Writes benchmarks/results/trpo_vs_ppo.json and trpo_vs_ppo.png (--larger_steps: trpo_vs_ppo_larger_steps.*).

Usage:
    python benchmarks/trpo_vs_ppo.py                 # ~10-20 min on a shared 2-core machine
    python benchmarks/trpo_vs_ppo.py --steps 4 --eval_prompts 16    # smoke run
    python benchmarks/trpo_vs_ppo.py --larger_steps  # PPO lr 3e-4, TRPO max_kl 0.03 -> trpo_vs_ppo_larger_steps.json
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from _common import RESULTS, result, write_result
from _rl_start import arithmetic_records, recipe, start_model

from lmstack.align.config import AlignConfig
from lmstack.align.ppo import PPOTrainer, plot_kl_per_step
from lmstack.align.rewards.verifiable import MathReward
from lmstack.align.trpo import TRPOTrainer
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer

SHAPE = dict(group_size=4, prompts_per_step=8, temperature=1.0, kl_coef=0.05, kl_estimator="k1")


def run(name: str, start, args, **kw) -> dict:
    """One training run (in its own process when --jobs 2: both runs then share the machine's contention alike)."""
    torch.set_num_threads(1)
    trainer_cls = {"ppo": PPOTrainer, "trpo": TRPOTrainer}[name]
    tok = load_tokenizer(start)
    train, val = arithmetic_records(max_difficulty=2)
    cfg = AlignConfig(method=name, max_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts, **SHAPE, **kw,
                      train={"steps": args.steps, "eval_every": 0, "progress": False, "device": "cpu", "seed": 0},
                      schedule={"warmup_steps": 2})
    trainer = trainer_cls(load_model(start, lazy=False), tok, cfg, MathReward())
    t0 = time.perf_counter()
    summary = trainer.fit(train, val)
    seconds = time.perf_counter() - t0
    final, _ = trainer.prepare(val[:32], step=10_000)  # fresh samples of the final policy on held-out prompts
    hist = summary["history"]
    kls = [h["kl"] for h in hist if "kl" in h]
    rewards = [h["reward_mean"] for h in hist]
    out = {"name": name, "history": hist, "seconds": seconds, "max_kl": max(kls), "final_kl": final["kl"],
           "final_reward": final["reward_mean"], "reward_first5": sum(rewards[:5]) / len(rewards[:5]),
           "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]), "eval_before": summary["eval_before"],
           "eval_after": summary["eval_after"]}
    if name == "trpo":
        acc = [h for h in hist if "trpo_accepted" in h]
        out["accepted_share"] = sum(h["trpo_accepted"] for h in acc) / max(1, len(acc))
        out["max_step_kl"] = max((h["step_kl"] for h in acc), default=0.0)
    print(f"{name}: reward first-5 {out['reward_first5']:.3f} last-5 {out['reward_last5']:.3f}; held-out "
          f"{out['eval_before']['mean']:.3f} -> {out['eval_after']['mean']:.3f} ± {out['eval_after']['stderr']:.3f}; "
          f"KL to start max {out['max_kl']:.2f}, final {out['final_kl']:.2f} nats/reply ({seconds:.0f}s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--eval_prompts", type=int, default=128)
    ap.add_argument("--max_kl", type=float, default=0.01)
    ap.add_argument("--ppo_lr", type=float, default=1e-4)
    ap.add_argument("--jobs", type=int, default=2, help="2 = run PPO and TRPO side by side in two processes")
    ap.add_argument("--larger_steps", action="store_true",
                    help="the second setting: PPO lr 3e-4 and TRPO max_kl 0.03, written to trpo_vs_ppo_larger_steps.json")
    args = ap.parse_args()
    args.name = "trpo_vs_ppo"
    if args.larger_steps:
        args.max_kl, args.ppo_lr, args.name = 0.03, 3e-4, "trpo_vs_ppo_larger_steps"
    torch.set_num_threads(1)
    start = start_model()
    kw = {"ppo": dict(optim={"lr": args.ppo_lr}, clip=0.2, ppo_epochs=4, minibatches=4),
          "trpo": dict(optim={"lr": 1e-3}, max_kl=args.max_kl, cg_iters=10, ppo_epochs=1, minibatches=1)}
    if args.jobs > 1:
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            futures = {name: pool.submit(run, name, start, args, **kw[name]) for name in ("ppo", "trpo")}
            ppo, trpo = futures["ppo"].result(), futures["trpo"].result()
    else:
        ppo, trpo = (run(name, start, args, **kw[name]) for name in ("ppo", "trpo"))
    png = plot_kl_per_step({"ppo (clip 0.2, 16 updates/rollout)": ppo["history"],
                            f"trpo (max_kl {args.max_kl:g})": trpo["history"]}, RESULTS / f"{args.name}.png",
                           keys=("kl", "reward_mean"), log_scale=False)
    common = dict(steps=args.steps, samples_per_step=SHAPE["group_size"] * SHAPE["prompts_per_step"],
                  max_new_tokens=args.max_new_tokens, kl_coef=SHAPE["kl_coef"], temperature=SHAPE["temperature"],
                  start=recipe(), task="world arithmetic, difficulty <= 2, math verifier", plot=png.name,
                  ppo="clip 0.2, 4 epochs x 4 minibatches, AdamW lr %g" % args.ppo_lr,
                  trpo=f"max_kl {args.max_kl}, 10 CG iterations, damping 0.1, 10 halvings; critic Adam lr 1e-3",
                  tuning="none: one run each at its standard setting", machine="2 cores, shared",
                  jobs=args.jobs)
    base = "PPO (clip 0.2), same rollouts"
    ev0 = trpo["eval_before"]
    rows = [
        result("trpo_vs_ppo", "final_kl_to_start_per_reply", False, round(trpo["final_kl"], 3), base,
               round(ppo["final_kl"], 3), max_kl_during_trpo=round(trpo["max_kl"], 3),
               max_kl_during_ppo=round(ppo["max_kl"], 3), **common),
        result("trpo_vs_ppo", "heldout_accuracy_after", True, round(trpo["eval_after"]["mean"], 4), base,
               round(ppo["eval_after"]["mean"], 4), n=trpo["eval_after"]["n"],
               stderr=round(trpo["eval_after"]["stderr"], 4), baseline_stderr=round(ppo["eval_after"]["stderr"], 4),
               before=round(ev0["mean"], 4), before_stderr=round(ev0["stderr"], 4), **common),
        result("trpo_vs_ppo", "train_reward_last5", True, round(trpo["reward_last5"], 4), base,
               round(ppo["reward_last5"], 4), trpo_first5=round(trpo["reward_first5"], 4),
               ppo_first5=round(ppo["reward_first5"], 4), final_reward_trpo=round(trpo["final_reward"], 4),
               final_reward_ppo=round(ppo["final_reward"], 4), **common),
        result("trpo_vs_ppo", "trpo_accepted_step_share", True, round(trpo["accepted_share"], 4), "every step", 1.0,
               max_accepted_step_kl=round(trpo["max_step_kl"], 5), max_kl=args.max_kl,
               seconds_trpo=round(trpo["seconds"], 1), seconds_ppo=round(ppo["seconds"], 1), **common),
    ]
    for row in rows:
        row["benchmark"] = args.name
    write_result(args.name, rows)


if __name__ == "__main__":
    main()
