"""Rejection-sampling fine-tuning rounds and self-consistency, from the speedrun's SFT checkpoint on arithmetic.

RFT: 3 rounds of (best-of-8 on 64 fresh train prompts of difficulty <= 2, keep correct replies, 20 SFT
steps on them), greedy accuracy on all test arithmetic problems after each round (baseline = round 0, the
SFT model). Self-consistency: greedy vs majority vote of 8 chains (temperature 0.7) on the same test
problems, and accuracy where the vote's agreement is low (flagged, < 0.5) vs high.

Usage:
    python benchmarks/rejection_sampling.py --run runs/20261128-190000      # ~6 min on 1 thread
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import result, write_result

from lmstack.stages.align import _data
from lmstack.align.config import AlignConfig
from lmstack.align.rewards.verifiable import MathReward
from lmstack.align.rft import RejectionSamplingTrainer
from lmstack.align.self_consistency import compare_greedy_majority
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun run directory (holds sft/run/model and world/)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sft = Path(args.run) / "sft" / "run" / "model"
    tok = load_tokenizer(sft)
    data = _data(Path(args.run) / "world", tok, load_model(sft).config.max_seq_len)
    test = data["arithmetic_test"]
    sc = compare_greedy_majority(load_model(sft, lazy=False), tok, test, k=8, temperature=0.7)
    print({k: v for k, v in sc.items()})
    cfg = AlignConfig(method="rft", rounds=args.rounds, group_size=8, batch_size=16, temperature=0.7, max_tokens=128,
                      eval_prompts=len(test), rft_prompts=64, train={"steps": 20, "progress": False, "device": "cpu"},
                      optim={"lr": 1e-4}, schedule={"warmup_steps": 3})
    easy = [r for r in data["arithmetic_train"] if r.get("difficulty", 0) <= 2]
    summary = RejectionSamplingTrainer(load_model(sft, lazy=False), tok, cfg, MathReward()).fit(easy, test)
    rounds = summary["rounds"]
    for r in rounds:
        print(r)
    base, last = rounds[0], rounds[-1]
    rows = [result("rejection_sampling", "rft_test_arithmetic_accuracy_after_last_round", True,
                   round(last["eval_mean"], 4), "SFT checkpoint (round 0)", round(base["eval_mean"], 4),
                   per_round=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rounds],
                   n_test=len(test), prompts_per_round=64, best_of=8, sft_steps_per_round=20, lr=cfg.optim.lr),
            result("rejection_sampling", "maj8_test_arithmetic_accuracy", True, round(sc["majority"]["mean"], 4),
                   "greedy", round(sc["greedy"]["mean"], 4), stderr=round(sc["majority"]["stderr"], 4),
                   pass_at_8=round(sc["pass_at_k"]["mean"], 4), mean_agreement=round(sc["mean_agreement"], 4),
                   flagged_fraction=round(sc["flagged_fraction"], 4),
                   majority_acc_flagged=round(sc["majority_flagged"]["mean"], 4),
                   majority_acc_unflagged=round(sc["majority_unflagged"]["mean"], 4), n_test=sc["n"])]
    write_result("rejection_sampling", rows)


if __name__ == "__main__":
    main()
