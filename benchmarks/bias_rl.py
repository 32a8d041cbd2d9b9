"""Bias correction by an RL penalty (issue 21, IX.7): demographic disparity on held-out counterfactual pairs before
and after GRPO WITH the bias penalty (ours: --reward math=1,bias=0.5) against GRPO WITHOUT it (the baseline:
--reward math), at the same steps, seed, prompts and task reward; arithmetic accuracy before and after for both.

Disparity (lmstack.safety.bias.measure_disparity, greedy replies to held-out pairs of the world whose given names
never occur in the RL prompts):
  answer_disparity   share of arithmetic twin pairs (same problem, name and gender swapped) whose answers differ
  sentiment_gap      mean |s(reply) - s(twin reply)| over free-form pairs, s = the lexicon sentiment in [-1, 1]
  sentiment_signed   mean s(female) - s(male)
  accuracy           arithmetic accuracy over both twins (the task the RL reward pays)
each with n and stderr.

The model: the speedrun's SFT and aligned models are measured as found. They show almost no sentiment gap (their
free-form replies are bio sentences without polarity words), so the RL comparison runs on a CONSTRUCTED model
organism: the speedrun SFT model fine-tuned (lmstack.adapt.finetune via safety.adversarial.adversarial_train) on
bias_rl.biased_chats of train-split pairs, where in a share --bias_rate of the pairs the woman's arithmetic solution
carries a slip and her free-form reply is negative (the man's is right and positive), plus a replay of the SFT
model's own data. Both GRPO runs start from this organism with BiasGroupTrainer (the twin of each drawn pair
prompt is rolled out in the same step; with --reward math the free-form prompts get no reward and are masked).

Both arms use GRPO's KL anchor (--kl_coef 0.1): a first run without it (kl 0, lr 1e-4, 60 steps, a weaker organism)
closed the sentiment gap by reward hacking, replies turned to babble with no polarity word (polar share 0.05), the
gap every fairness penalty also pays; `polar` and `names_person` are reported to catch that.

Results (benchmarks/results/bias_rl.json; speedrun 20261207-064249, 2-core shared CPU, 1 thread; 100 held-out pairs of
each kind; GRPO 60 steps, mean over seeds 0, 1, 2 [stderr from the pairs; sd across seeds]; ~3 min per GRPO run):
  speedrun SFT as found      answer_disparity 0.19 (0.04), sentiment_gap 0.10 (0.03), signed 0.00, polar 0.05
  speedrun aligned as found  answer_disparity 0.21 (0.04), sentiment_gap 0.13 (0.03), signed -0.01, polar 0.075
  organism before RL         answer_disparity 0.51, sentiment_gap 0.70 (0.08), signed -0.48 (0.10), accuracy 0.105
  GRPO without the penalty   answer_disparity 0.46, sentiment_gap 0.79 [0.05; 0.10], signed -0.53, accuracy 0.13
  GRPO with the penalty      answer_disparity 0.45, sentiment_gap 0.14 [0.02; 0.10], signed +0.06, accuracy 0.12
                             [0.013], polar 0.95 (kept: female sentiment 0.31 -> 0.96, male 0.79 -> 0.90)
The answer term does not lower answer disparity here (0.45 vs 0.46, diff stderr 0.04): at ~12% accuracy the twins'
sampled answers rarely agree, so its signal is thin, and disparity is mostly the weak model's sensitivity to the
name tokens (0.19 as found).

Usage (heavy: run under the flock):
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/bias_rl.py --run /tmp/sr11/runs/20261207-064249
    python benchmarks/bias_rl.py --run RUN --steps 40 --n 100 --out /tmp/bias_rl
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import shutil
import time

import torch
from _common import result, write_result

from lmstack.align.config import AlignConfig
from lmstack.align.rewards.spec import reward_from_spec
from lmstack.model.hf_io import load_model, save_model
from lmstack.safety.adversarial import adversarial_train, replay_rows
from lmstack.safety.bias import make_pairs, measure_disparity, pair_records
from lmstack.safety.bias_rl import BiasGroupTrainer, biased_chats
from lmstack.safety.redteam import ModelTarget
from lmstack.tokenizer import load_tokenizer
from lmstack.world import World

KEYS = ("answer_disparity", "sentiment_gap", "sentiment_signed", "accuracy", "accuracy_female", "accuracy_male",
        "names_person")
# descriptive (which way a gap closed, and whether by saying nothing polar): in the sentiment_gap row's config
DESCRIPTIVE = ("sentiment_female", "sentiment_male", "polar")
HIGHER = {"answer_disparity": False, "sentiment_gap": False, "sentiment_signed": False, "accuracy": True,
          "accuracy_female": True, "accuracy_male": True, "names_person": True}


def rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def disparity(model_dir, world, args) -> dict:
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    target = ModelTarget(model.eval(), tok, max_new_tokens=args.max_tokens)
    t0 = time.perf_counter()
    out = measure_disparity(target, world, n=args.n, seed=args.eval_seed, split="test", max_new_tokens=args.max_tokens)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(model_dir, json.dumps({k: round(out[k]["value"], 4) for k in KEYS + DESCRIPTIVE}))
    return out


def build_organism(run: Path, world, args) -> Path:
    pairs = make_pairs(world, n=args.organism_pairs, seed=0, split="train")
    rows = biased_chats(pairs, against="female", rate=args.bias_rate, seed=0)
    rows += replay_rows(run / "sft" / "data" / "train.jsonl", args.replay_rows, seed=0)
    summary = adversarial_train(run / "sft" / "run" / "model", rows, Path(args.out) / "organism",
                                steps=args.organism_steps, lr=args.organism_lr, seed=0)
    return Path(summary["result"])


def grpo(organism: Path, reward: str, records: list[dict], out: Path, args) -> dict:
    torch.manual_seed(args.seed)
    policy, tok = load_model(str(organism), lazy=False), load_tokenizer(str(organism))
    cfg = AlignConfig(method="grpo", group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                      temperature=1.0, max_tokens=args.max_tokens, kl_coef=args.kl_coef, eval_prompts=0, reward=reward,
                      train={"steps": args.steps, "progress": False, "device": "cpu", "seed": args.seed,
                             "log_every": 1, "eval_every": 0},
                      optim={"lr": args.lr}, schedule={"warmup_steps": 3})
    summary = BiasGroupTrainer(policy, tok, cfg, reward_from_spec(reward)).fit(records, out_dir=out)
    save_model(policy, out / "model", tokenizer=tok)
    keep = ("reward_mean", "score_math", "score_bias", "informative_fraction", "completion_tokens")
    curve = [{k: round(h[k], 4) for k in ("step", *keep) if k in h and h[k] == h[k]} for h in summary["history"]]
    return {"model": out / "model", "seconds": round(summary["train_seconds"], 1), "curve": curve}


def summarise(measures: list[dict], key: str) -> dict:
    """The mean over seeds of a measure's value, the stderr of that mean from the measures' own stderrs (the
    held-out pairs are the same for every seed), and the sd across seeds."""
    values = [m[key] for m in measures]
    k = len(values)
    mean = sum(v["value"] for v in values) / k
    sd = math.sqrt(sum((v["value"] - mean) ** 2 for v in values) / (k - 1)) if k > 1 else 0.0
    return {"value": mean, "stderr": math.sqrt(sum(v["stderr"] ** 2 for v in values)) / k, "seed_sd": sd,
            "n": values[0]["n"], "per_seed": [round(v["value"], 4) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun run directory (holds sft/, align/ and world/)")
    ap.add_argument("--out", default="/tmp/bias_rl")
    ap.add_argument("--name", default="bias_rl")
    ap.add_argument("--organism", default="", help="reuse this organism model directory instead of building one")
    ap.add_argument("--n", type=int, default=100, help="held-out pairs of each kind (arithmetic, free-form)")
    ap.add_argument("--eval_seed", type=int, default=100)
    ap.add_argument("--seeds", default="0", help="comma-separated GRPO seeds (each runs both arms)")
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps of each run")
    ap.add_argument("--rl_pairs", type=int, default=64, help="train-split pairs of each kind in the RL prompts")
    ap.add_argument("--prompts_per_step", type=int, default=8, help="drawn prompts per step (each brings its twin)")
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl_coef", type=float, default=0.1, help="GRPO's KL anchor to the organism (both arms)")
    ap.add_argument("--max_tokens", type=int, default=96)
    ap.add_argument("--bias_weight", type=float, default=0.5)
    ap.add_argument("--bias_rate", type=float, default=0.75, help="share of the organism's pairs treated unfairly")
    ap.add_argument("--organism_pairs", type=int, default=200)
    ap.add_argument("--organism_steps", type=int, default=400)
    ap.add_argument("--organism_lr", type=float, default=3e-4)
    ap.add_argument("--replay_rows", type=int, default=400)
    ap.add_argument("--machine", default="2-core shared CPU, 1 thread")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    world = World.from_manifest(run / "world")
    t0 = time.perf_counter()
    found = {name: disparity(run / rel, world, args) for name, rel in (("speedrun_sft", "sft/run/model"),
                                                                        ("speedrun_aligned", "align/model"))}
    organism = Path(args.organism) if args.organism else build_organism(run, world, args)
    before = disparity(organism, world, args)
    records = pair_records(make_pairs(world, n=args.rl_pairs, seed=1, split="train"))
    spec = f"math=1,bias={args.bias_weight}"
    arms = {"without": "math", "with": spec}
    after, curves, seconds = {a: [] for a in arms}, {}, {}
    for seed in seeds:
        args.seed = seed
        for label, reward in arms.items():
            r = grpo(organism, reward, records, out / f"{label}_seed{seed}", args)
            after[label].append(disparity(r["model"], world, args))
            curves[f"{label}_seed{seed}"], seconds[f"{label}_seed{seed}"] = r["curve"], r["seconds"]
    common = {"run": run.name, "machine": args.machine, "heldout_pairs_per_kind": args.n, "eval_split": "test",
              "eval_seed": args.eval_seed, "rl_prompts": len(records), "rl_split": "train (given names disjoint)",
              "steps": args.steps, "seeds": seeds, "group_size": args.group_size,
              "prompts_per_step": f"{args.prompts_per_step} drawn + their twins", "lr": args.lr,
              "kl_coef": args.kl_coef, "max_tokens": args.max_tokens, "reward_ours": spec, "reward_baseline": "math",
              "organism": {"base": "speedrun sft/run/model", "pairs": args.organism_pairs, "bias_rate": args.bias_rate,
                           "against": "female", "steps": args.organism_steps, "lr": args.organism_lr,
                           "replay_rows": args.replay_rows, "constructed": True, "dir": str(organism)},
              "sentiment": "lexicon (lmstack.align.rewards.bias.sentiment)",
              "values": "mean over seeds; stderr from the held-out pairs, seed_sd across seeds"}
    rows = []
    for key in KEYS:
        ours, base = summarise(after["with"], key), summarise(after["without"], key)
        higher = HIGHER[key]
        absolute = key == "sentiment_signed"
        value = (lambda d: abs(d["value"])) if absolute else (lambda d: d["value"])
        r = result(args.name, key + ("_abs" if absolute else ""), bool(higher), round(value(ours), 4),
                   "GRPO without the bias penalty (reward math)", round(value(base), 4), goal=None, n=ours["n"],
                   ours_stderr=round(ours["stderr"], 4), baseline_stderr=round(base["stderr"], 4),
                   ours_seed_sd=round(ours["seed_sd"], 4), baseline_seed_sd=round(base["seed_sd"], 4),
                   ours_per_seed=ours["per_seed"], baseline_per_seed=base["per_seed"],
                   diff=round(ours["value"] - base["value"], 4),
                   diff_stderr=round(math.hypot(ours["stderr"], base["stderr"]), 4),
                   organism_before=rounded(before[key]), speedrun_sft=rounded(found["speedrun_sft"][key]),
                   speedrun_aligned=rounded(found["speedrun_aligned"][key]), **common)
        if value(ours) == value(base):
            r["ratio"] = 1.0
        rows.append(r)
    gap = next(r for r in rows if r["metric"] == "sentiment_gap")
    for key in DESCRIPTIVE:
        gap["config"][key] = {"ours": summarise(after["with"], key), "baseline": summarise(after["without"], key),
                              "organism_before": rounded(before[key]),
                              "speedrun_sft": rounded(found["speedrun_sft"][key]),
                              "speedrun_aligned": rounded(found["speedrun_aligned"][key])}
    rows[0]["config"].update(curves=curves, rl_seconds=seconds, seconds_total=round(time.perf_counter() - t0, 1))
    write_result(args.name, rows)


if __name__ == "__main__":
    main()
