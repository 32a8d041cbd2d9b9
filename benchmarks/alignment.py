"""Alignment from the speedrun's SFT checkpoint: each method's effect on held-out world metrics, before/after.

Starts from RUN/sft/run/model (a `make speedrun` run directory) and the run's world files, and measures
(test splits, greedy; settings were chosen on the val splits, never on test):
  rm     reward model (Bradley-Terry head on the SFT model): test pairwise accuracy vs the length heuristic
  dpo    DPO on the train preference pairs: log π(chosen) > log π(rejected) on test pairs, QA / arithmetic /
         instruction correctness, refusal of harmful requests and of their benign look-alikes
  grpo   GRPO on easier train arithmetic with the math verifier: test arithmetic accuracy ± stderr
  rloo   the same with the leave-one-out baseline
Baseline of each row = the SFT checkpoint on the same metric. Every method starts from the SFT weights.

Usage:
    python benchmarks/alignment.py --run runs/20261128-190000             # ~12 min on 1 thread
    python benchmarks/alignment.py --run RUN --only grpo --grpo_steps 40
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import result, write_result

from lmstack.stages.align import _data, measure
from lmstack.align.config import AlignConfig
from lmstack.align.dpo import PreferenceTrainer
from lmstack.align.grpo import GroupTrainer
from lmstack.align.reward_model import RewardModel, pairwise_accuracy, train_reward_model
from lmstack.align.rewards.heuristics import n_words
from lmstack.align.rewards.verifiable import MathReward
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer


def length_accuracy(pairs) -> float:
    return sum(n_words(p.chosen) > n_words(p.rejected) for p in pairs) / len(pairs)


def run_rm(sft, tok, data, args) -> list[dict]:
    cfg = AlignConfig(method="rm", batch_size=8, max_len=256, center_coef=0.01,
                      train={"steps": args.rm_steps, "eval_every": 0, "log_every": 25, "progress": False, "seed": 0},
                      optim={"lr": args.rm_lr}, schedule={"warmup_steps": 20})
    rm = RewardModel(load_model(sft, lazy=False), seed=0)
    summary = train_reward_model(rm, tok, data["pairs_train"], [], cfg, log=print)
    val = pairwise_accuracy(rm, tok, data["pairs_val"])["accuracy"]
    test = pairwise_accuracy(rm, tok, data["pairs_test"])
    print(f"rm: val {val:.3f}, test {test['accuracy']:.3f} in {summary['train_seconds']:.0f} s")
    return [result("alignment", "rm_heldout_pairwise_accuracy", True, round(test["accuracy"], 4),
                   "longer reply wins (length heuristic)", round(length_accuracy(data["pairs_test"]), 4), goal=0.8,
                   val_accuracy=round(val, 4), steps=cfg.train.steps, lr=cfg.optim.lr, n_test=len(data["pairs_test"]),
                   per_kind={k[9:]: round(v, 4) for k, v in test.items() if k.startswith("accuracy/")},
                   seconds=round(summary["train_seconds"], 1), start="speedrun SFT checkpoint")]


def run_dpo(sft, tok, data, before, args) -> list[dict]:
    policy = load_model(sft, lazy=False)
    cfg = AlignConfig(method="dpo", beta=0.1, batch_size=8, max_len=policy.config.max_seq_len,
                      train={"steps": args.dpo_steps, "eval_every": 0, "progress": False, "device": "cpu"},
                      optim={"lr": args.dpo_lr}, schedule={"warmup_steps": 10})
    fit = PreferenceTrainer(policy, tok, cfg).fit(data["pairs_train"], data["pairs_val"][:64])
    after = measure(policy, tok, data, args.n_eval)
    print("dpo after:", json.dumps({k: round(v, 3) for k, v in after.items()}))
    common = dict(steps=cfg.train.steps, lr=cfg.optim.lr, beta=cfg.beta, seconds=round(fit["train_seconds"], 1),
                  val_implicit_accuracy=round(fit["val_after"]["accuracy"], 4))
    rows = [result("alignment", "dpo_test_preference_accuracy", True, round(after["preference_accuracy"], 4),
                   "SFT checkpoint", round(before["preference_accuracy"], 4), n_test=len(data["pairs_test"]), **common)]
    for key in ("arithmetic", "qa", "instruction"):
        rows.append(result("alignment", f"dpo_{key}_accuracy", True, round(after[key], 4), "SFT checkpoint",
                           round(before[key], 4), **common))
    rows.append(result("alignment", "dpo_harmful_refusal_rate", True, round(after["harmful_refusal_rate"], 4),
                       "SFT checkpoint", round(before["harmful_refusal_rate"], 4), n=after["n_harmful"], **common))
    rows.append(result("alignment", "dpo_benign_over_refusal_rate", False, round(after["benign_refusal_rate"], 4),
                       "SFT checkpoint", round(before["benign_refusal_rate"], 4), n=after["n_benign"], **common))
    return rows


def run_group(method, sft, tok, data, before, args) -> list[dict]:
    from lmstack.align.rollout import evaluate_policy

    policy = load_model(sft, lazy=False)
    cfg = AlignConfig(method=method, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                      temperature=args.temperature, max_tokens=128, eval_prompts=0,
                      train={"steps": args.grpo_steps, "progress": True, "device": "cpu", "seed": 0},
                      optim={"lr": args.grpo_lr}, schedule={"warmup_steps": 3})
    easy = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= args.max_difficulty]
    fit = GroupTrainer(policy, tok, cfg, MathReward()).fit(easy)
    val = evaluate_policy(policy, tok, data["arithmetic_val"], MathReward())
    test = evaluate_policy(policy, tok, data["arithmetic_test"], MathReward())
    gain = test["mean"] - before["arithmetic"]
    se = (test["stderr"] ** 2 + before["arithmetic_stderr"] ** 2) ** 0.5
    print(f"{method}: test arithmetic {before['arithmetic']:.3f} -> {test['mean']:.3f} (gain {gain:+.3f} ± {se:.3f}); "
          f"val {before['arithmetic_val']:.3f} -> {val['mean']:.3f}")
    return [result("alignment", f"{method}_arithmetic_accuracy", True, round(test["mean"], 4), "SFT checkpoint",
                   round(before["arithmetic"], 4), stderr=round(test["stderr"], 4),
                   baseline_stderr=round(before["arithmetic_stderr"], 4), gain_points=round(100 * gain, 2),
                   gain_stderr_points=round(100 * se, 2), n_test=test["n"], val_before=round(before["arithmetic_val"], 4),
                   val_after=round(val["mean"], 4),
                   steps=fit["steps"], lr=cfg.optim.lr, group_size=cfg.group_size, temperature=cfg.temperature,
                   train_prompts=len(easy), max_difficulty=args.max_difficulty,
                   seconds=round(fit["train_seconds"], 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun run directory (holds sft/run/model and world/)")
    ap.add_argument("--only", nargs="*", default=["rm", "dpo", "grpo", "rloo"])
    ap.add_argument("--rm_steps", type=int, default=300)
    ap.add_argument("--rm_lr", type=float, default=3e-4)
    ap.add_argument("--dpo_steps", type=int, default=150)
    ap.add_argument("--dpo_lr", type=float, default=5e-5)
    ap.add_argument("--grpo_steps", type=int, default=60)
    ap.add_argument("--grpo_lr", type=float, default=1e-4)
    ap.add_argument("--max_difficulty", type=int, default=2)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--prompts_per_step", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--n_eval", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny model on a shared 2-core box: one thread is faster (see reward_model.py)
    run = Path(args.run)
    sft = run / "sft" / "run" / "model"
    tok = load_tokenizer(sft)
    data = _data(run / "world", tok, load_model(sft).config.max_seq_len)
    start = time.perf_counter()
    from lmstack.align.rollout import evaluate_policy

    before = measure(load_model(sft, lazy=False), tok, data, args.n_eval)
    before["arithmetic_val"] = evaluate_policy(load_model(sft, lazy=False), tok, data["arithmetic_val"],
                                               MathReward())["mean"]
    print("SFT:", json.dumps({k: round(v, 3) for k, v in before.items()}))
    rows = []
    if "rm" in args.only:
        rows += run_rm(sft, tok, data, args)
    if "dpo" in args.only:
        rows += run_dpo(sft, tok, data, before, args)
    for method in ("grpo", "rloo"):
        if method in args.only:
            rows += run_group(method, sft, tok, data, before, args)
    for r in rows:
        r["config"]["run"] = run.name
    print(f"total {time.perf_counter() - start:.0f} s")
    out = Path(__file__).resolve().parent / "results" / "alignment.json"
    if out.is_file() and set(args.only) != {"rm", "dpo", "grpo", "rloo"}:  # a partial rerun keeps the other rows
        kept = [r for r in json.loads(out.read_text()) if r["metric"].split("_")[0] not in args.only]
        rows = kept + rows
    write_result("alignment", rows)


if __name__ == "__main__":
    main()
