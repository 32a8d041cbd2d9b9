"""Multi-agent self-play, measured: an asker and an answerer, two models that both learn (MultiAgentTrainer), on
world arithmetic, from the shared RL start model (_rl_start.py, which learned the asker role by SFT).

The asker is given "Ask me this question: <problem>" and writes the question; the answerer replies (up to
max_turns turns, a templated follow-up after a wrong reply); the math verifier checks against the record.
Payoffs: answerer 1 when solved; asker 1 when solved and its question carried exactly the problem's numbers.
Reported before and after training, greedy on the held-out val split (n prompts, stderr): each agent's reward,
the share of faithful questions and the dialogue length. Writes benchmarks/results/multi_agent.json.

Usage:
    python benchmarks/multi_agent.py                 # ~10 min on a shared 2-core machine
    python benchmarks/multi_agent.py --steps 2 --eval_prompts 8      # smoke run
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import result, write_result
from _rl_start import arithmetic_records, recipe, start_model

from lmstack.align.config import AlignConfig
from lmstack.align.rewards.verifiable import MathReward
from lmstack.align.self_play import MultiAgentTrainer
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max_turns", type=int, default=2)
    ap.add_argument("--eval_prompts", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = start_model()
    tok = load_tokenizer(start)
    train, val = arithmetic_records(max_difficulty=2)
    cfg = AlignConfig(method="grpo", group_size=4, prompts_per_step=8, max_tokens=64, temperature=1.0,
                      eval_prompts=args.eval_prompts,
                      train={"steps": args.steps, "eval_every": 0, "progress": False, "device": "cpu", "seed": 0},
                      optim={"lr": args.lr}, schedule={"warmup_steps": 2})
    cfg.max_turns = args.max_turns
    trainer = MultiAgentTrainer(load_model(start, lazy=False), tok, cfg, MathReward())
    t0 = time.perf_counter()
    summary = trainer.fit(train, val)
    seconds = time.perf_counter() - t0
    b, a, hist = summary["eval_before"], summary["eval_after"], summary["history"]
    for name, ev in (("before", b), ("after", a)):
        print(f"{name}: answerer {ev['mean']:.3f} ± {ev['stderr']:.3f}, asker {ev['asker_mean']:.3f} ± "
              f"{ev['asker_stderr']:.3f}, faithful {ev['faithful']:.3f}, turns {ev['mean_turns']:.2f} (n={ev['n']})")
    common = dict(start=recipe(), steps=args.steps, dialogues_per_step=32, max_turns=args.max_turns, lr=args.lr,
                  task="world arithmetic difficulty <= 2 (val split held out), math verifier",
                  payoffs="answerer: solved; asker: solved x faithful (the question carries exactly the "
                          "problem's numbers)",
                  seconds=round(seconds, 1), machine="2 cores, shared",
                  train_answerer_reward_per_step=[round(h.get("answerer_reward", float("nan")), 4) for h in hist],
                  train_asker_reward_per_step=[round(h.get("asker_reward", float("nan")), 4) for h in hist])
    rows = [
        result("multi_agent", "answerer_reward_after", True, round(a["mean"], 4), "the same agents before training",
               round(b["mean"], 4), n=a["n"], stderr=round(a["stderr"], 4), baseline_stderr=round(b["stderr"], 4),
               mean_turns_after=round(a["mean_turns"], 3), mean_turns_before=round(b["mean_turns"], 3), **common),
        result("multi_agent", "asker_reward_after", True, round(a["asker_mean"], 4), "the same agents before training",
               round(b["asker_mean"], 4), n=a["asker_n"], stderr=round(a["asker_stderr"], 4),
               baseline_stderr=round(b["asker_stderr"], 4), faithful_after=round(a["faithful"], 4),
               faithful_before=round(b["faithful"], 4), **common),
    ]
    write_result("multi_agent", rows)


if __name__ == "__main__":
    main()
