"""The closed human-feedback loop, measured: train a reward model with `lmstack align --method rm`, then run GRPO
against it with `lmstack align --method grpo --reward rm:DIR`, alone and inside a weighted mixture with the math
verifier, logging the RM's and the verifier's scores through training (reward over-optimisation shows as the RM
score climbing while the verifier's does not).

Data: arithmetic preference pairs (the world's 'correctness' pairs plus, for each arithmetic chat of the train split,
its reference solution against the same solution with the final result changed: an arithmetic slip), a held-out
set built the same way from the val split. Policy and RM backbone: the shared RL start model (_rl_start.py).
Runs (same seeds, same rollouts budget: steps x prompts_per_step x group_size samples):
  rm     --reward rm:DIR --monitor math          the RM alone is optimised; the verifier only watches
  mix    --reward math=1,rm:DIR=0.5              the verifier and the RM together (both logged as components)
Writes benchmarks/results/rm_loop.json and rm_loop_<run>.png (score_rm and score_math per step).

Usage:
    python benchmarks/rm_loop.py                     # ~10-20 min on a shared 2-core machine
    python benchmarks/rm_loop.py --steps 3 --rm_steps 10 --eval_prompts 8     # smoke run
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _common import RESULTS, result, write_result
from _rl_start import arithmetic_records, recipe, start_model, world

from lmstack.align.rollout import prompt_text
from lmstack.cli import main as lmstack


def slip(solution: str, answer: int, rng: random.Random) -> str:
    """The same solution with its final result changed (in the last equation and after ####)."""
    wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    text = re.sub(r"#### -?\d+\s*$", f"#### {wrong}", solution)
    return re.sub(rf"= {answer}(\D*)\n#### ", rf"= {wrong}\g<1>\n#### ", text)


def pairs(split: str, limit: int | None, seed: int) -> list[dict]:
    rng = random.Random(seed)
    w = world()
    out = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
           for r in w.corpus("preferences", split=split) if r["kind"] == "correctness"]
    chats = [r for r in w.corpus("chat", split=split) if r["kind"] == "arithmetic"][:limit]
    for r in chats:
        solution = r["messages"][-1]["content"]
        bad = slip(solution, int(r["answer"]), rng)
        if bad != solution:
            out.append({"prompt": prompt_text(r), "chosen": solution, "rejected": bad})
    rng.shuffle(out)
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def grpo(name: str, start: Path, prompts: Path, val: Path, out: Path, args, reward: str, monitor: str = "") -> dict:
    flags = ["align", "--method", "grpo", "--model", str(start), "--data", str(prompts), "--val_data", str(val),
             "--out", str(out), "--reward", reward, "--train.steps", str(args.steps), "--group_size", "4",
             "--prompts_per_step", "8", "--max_tokens", "64", "--optim.lr", str(args.lr),
             "--schedule.warmup_steps", "2", "--eval_prompts", str(args.eval_prompts), "--train.eval_every", "0",
             "--train.log_every", "1", "--train.progress", "false", "--train.device", "cpu", "--train.seed", "0"]
    if monitor:
        flags += ["--monitor", monitor]
    torch.set_num_threads(1)
    assert lmstack(flags) == 0, f"grpo run {name} failed"
    shutil.copyfile(out / "reward_scores.png", RESULTS / f"rm_loop_{name}.png")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rm_steps", type=int, default=150)
    ap.add_argument("--eval_prompts", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = start_model()
    tmp = Path(tempfile.mkdtemp(prefix="rm_loop_"))
    train_pairs, val_pairs = pairs("train", None, 0), pairs("val", 100, 1)
    prefs, val_prefs = write_jsonl(train_pairs, tmp / "prefs.jsonl"), write_jsonl(val_pairs, tmp / "val_prefs.jsonl")
    rm_flags = ["align", "--method", "rm", "--model", str(start), "--data", str(prefs), "--val_data", str(val_prefs),
                "--out", str(tmp / "rm"), "--train.steps", str(args.rm_steps), "--batch_size", "16",
                "--optim.lr", "3e-4", "--schedule.warmup_steps", "10", "--train.eval_every", "0",
                "--train.progress", "false", "--train.device", "cpu"]
    assert lmstack(rm_flags) == 0, "reward model training failed"
    rm_summary = json.loads((tmp / "rm" / "summary.json").read_text())
    rm_dir = tmp / "rm" / "model"
    train, val = arithmetic_records(max_difficulty=2)
    prompts, val_prompts = write_jsonl(train, tmp / "prompts.jsonl"), write_jsonl(val, tmp / "val_prompts.jsonl")
    specs = {"rm": (f"rm:{rm_dir}", "math"), "mix": (f"math=1,rm:{rm_dir}=0.5", "")}
    # the two GRPO runs side by side in two processes: the machine's contention hits both alike
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futures = {name: pool.submit(grpo, name, start, prompts, val_prompts, tmp / f"grpo_{name}", args, reward,
                                     monitor) for name, (reward, monitor) in specs.items()}
        runs = {name: f.result() for name, f in futures.items()}
    rm_acc0, rm_acc1 = rm_summary["val_before"]["accuracy"], rm_summary["val_after"]["accuracy"]
    n_val = len(val_pairs)
    common = dict(start=recipe(), steps=args.steps, samples_per_step=32, max_new_tokens=64, lr=args.lr, kl_coef=0.0,
                  rm_steps=args.rm_steps, rm_train_pairs=len(train_pairs), rm_val_pairs=n_val,
                  task="world arithmetic difficulty <= 2 (val split held out)", machine="2 cores, shared")
    rows = [result("rm_loop", "rm_val_pair_accuracy", True, round(rm_acc1, 4), "the same RM before training",
                   round(rm_acc0, 4), n=n_val, stderr=round((rm_acc1 * (1 - rm_acc1) / n_val) ** 0.5, 4),
                   baseline_stderr=round((rm_acc0 * (1 - rm_acc0) / n_val) ** 0.5, 4), **common)]
    for name, s in runs.items():
        hist, b, a = s["history"], s["eval_before"], s["eval_after"]
        if name == "rm":  # the RM is the whole reward here: its score is the run's reward itself
            for d in (b, a):
                d["score_rm"], d["score_rm_stderr"], d["score_rm_n"] = d["mean"], d["stderr"], d["n"]
            for h in hist:
                h["score_rm"] = h["reward_mean"]
        for key in ("math", "rm"):
            rows.append(result("rm_loop", f"heldout_{key}_score_after_{name}", True, round(a[f"score_{key}"], 4),
                               "the start model", round(b[f"score_{key}"], 4), n=int(a[f"score_{key}_n"]),
                               stderr=round(a[f"score_{key}_stderr"], 4),
                               baseline_stderr=round(b[f"score_{key}_stderr"], 4),
                               per_step=[round(h.get(f"score_{key}", float("nan")), 4) for h in hist],
                               reward=("rm:DIR (monitor math)" if name == "rm" else "math=1,rm:DIR=0.5"), **common))
        print(f"{name}: held-out math {b['score_math']:.3f} -> {a['score_math']:.3f} ± {a['score_math_stderr']:.3f}; "
              f"RM score {b['score_rm']:.3f} -> {a['score_rm']:.3f} (n={a['n']})")
    write_result("rm_loop", rows)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
