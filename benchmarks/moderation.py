"""Moderation classifiers (lmstack.safety.moderation, issue 21 §1): per-category precision and recall on held-out
templates, context-aware vs last-message-only judging of conversations, and latency per text.

Data: lmstack.safety.moderation_data on World(seed=0, size="small"): every template list split 3:1:1 by position,
so the test split holds phrasings no classifier trained on. Three moderators:
  keyword  the baseline: forbidden-brew phrases, the data pipeline's toxic word list, the PII regexes (no training)
  hashed   tier 1: hashed word + char n-grams, one logistic regression per category
  encoder  tier 2: all-MiniLM-L6-v2 (real weights) fine-tuned with a linear head (--steps, capped by --max-seconds)
Figures:
  - precision and recall per category of each tier on the test singles (n and binomial stderr in config), the
    keyword filter as the baseline;
  - on the test conversations (split-harm: each message benign, the whole harmful; look-alike: the same turns
    about the festival drink; reverse: a quoted harmful request in a benign whole): accuracy of judging the whole
    rendered conversation against judging only the last message, per tier, and the split-harm flag rate;
  - milliseconds per text, one text per call (what a guard pays per window), each tier vs the keyword filter.

Usage:
    flock /tmp/lmstack-bench.lock .venv/bin/python benchmarks/moderation.py            # ~3-5 minutes on 2 cores
    .venv/bin/python benchmarks/moderation.py --steps 40 --per-template 8                # a quick look
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np

from _common import result, write_result
from lmstack.safety.moderation import KeywordModerator, evaluate, train_hashed
from lmstack.safety.moderation_data import CATEGORIES, build_examples, message_examples
from lmstack.safety.moderation_encoder import EncoderTrainConfig, train_encoder_moderator
from lmstack.threads import set_threads
from lmstack.world import World

NAME = "moderation"


def conversation_scores(mod, convs: list[dict]) -> dict:
    """Accuracy (n, stderr) of whole-conversation vs last-message judging, and per-kind flag rates."""
    out = {}
    for context in ("conversation", "last_message"):
        flags = [mod.score_conversation(r["messages"], context).categories["harmful_instructions"] for r in convs]
        right = [f == bool(r["labels"]) for f, r in zip(flags, convs)]
        acc = float(np.mean(right))
        out[context] = {"accuracy": round(acc, 4), "stderr": round(math.sqrt(acc * (1 - acc) / len(right)), 4),
                        "n": len(right)}
        for kind in ("split_harm", "lookalike", "reverse"):
            sel = [f for f, r in zip(flags, convs) if r["kind"] == kind]
            rate = float(np.mean(sel))
            out[context][f"flag_rate/{kind}"] = {"value": round(rate, 4), "n": len(sel),
                                                 "stderr": round(math.sqrt(rate * (1 - rate) / len(sel)), 4)}
    return out


def ms_per_text(mod, texts: list[str]) -> float:
    mod.classify(texts[:4])  # warm-up
    times = []
    for t in texts:
        start = time.perf_counter()
        mod.classify([t])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-template", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150, help="tier 2 fine-tuning steps")
    ap.add_argument("--max-seconds", type=float, default=420.0, help="cap on tier 2's training time")
    ap.add_argument("--latency-texts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    rows = build_examples(World(seed=0, size="small"), per_template=args.per_template)
    rows += message_examples(rows)
    test = [r for r in rows if r["split"] == "test" and r["kind"] == "single"]
    convs = [r for r in rows if r["split"] == "test" and "messages" in r]
    n_train = sum(r["split"] == "train" for r in rows)
    print(f"{n_train} training rows, {len(test)} test singles, {len(convs)} test conversations")

    mods, train_s = {"keyword": KeywordModerator()}, {"keyword": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mods["hashed"] = train_hashed(rows, f"{tmp}/hashed")
        train_s["hashed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc_cfg = EncoderTrainConfig(init="minilm", steps=args.steps, max_seconds=args.max_seconds, progress=False,
                                     threads=args.threads)
        mods["encoder"] = train_encoder_moderator(rows, f"{tmp}/encoder", enc_cfg)
        train_s["encoder"] = time.perf_counter() - t0

    per_cat = {tier: evaluate(mod, test) for tier, mod in mods.items()}
    context = {tier: conversation_scores(mod, convs) for tier, mod in mods.items()}
    latency_texts = [r["text"] for r in test][:args.latency_texts]
    latency = {tier: ms_per_text(mod, latency_texts) for tier, mod in mods.items()}
    enc_steps = getattr(mods["encoder"], "trained_steps", 0)
    for tier in mods:
        print(tier, {c: (m["precision"], m["recall"]) for c, m in per_cat[tier].items()},
              "conv acc", context[tier]["conversation"]["accuracy"], "last", context[tier]["last_message"]["accuracy"],
              f"{latency[tier]:.3f} ms/text", f"train {train_s[tier]:.1f} s")

    common = {"world": "seed 0, small", "per_template": args.per_template, "n_train_rows": n_train,
              "tier2": f"all-MiniLM-L6-v2 fine-tuned, {enc_steps} of {args.steps} steps run (time cap "
                       f"{args.max_seconds} s), batch 32",
              "threads": args.threads}
    out = []
    for tier in ("hashed", "encoder"):
        for cat in CATEGORIES:
            ours, base = per_cat[tier][cat], per_cat["keyword"][cat]
            for metric in ("precision", "recall"):
                n_key = "n_predicted" if metric == "precision" else "n_positive"
                out.append(result(NAME, f"{tier}_{metric}/{cat}", True, ours[metric], "keyword filter", base[metric],
                                  goal=None, n=ours[n_key], stderr=ours[f"{metric}_stderr"], baseline_n=base[n_key],
                                  baseline_stderr=base[f"{metric}_stderr"], split="test (held-out templates)",
                                  **common))
        whole, last = context[tier]["conversation"], context[tier]["last_message"]
        out.append(result(NAME, f"{tier}_conversation_accuracy", True, whole["accuracy"],
                          "the same moderator on the last message only", last["accuracy"], goal=None,
                          n=whole["n"], stderr=whole["stderr"], baseline_stderr=last["stderr"],
                          split_harm_flag_rate=whole["flag_rate/split_harm"],
                          split_harm_flag_rate_last_message=last["flag_rate/split_harm"],
                          lookalike_flag_rate=whole["flag_rate/lookalike"],
                          reverse_flag_rate=whole["flag_rate/reverse"], **common))
        out.append(result(NAME, f"{tier}_ms_per_text", False, round(latency[tier], 4), "keyword filter",
                          round(latency["keyword"], 4), goal=None, texts=len(latency_texts), batch=1,
                          train_seconds=round(train_s[tier], 1), **common))
    out.append(result(NAME, "encoder_vs_hashed_ms_per_text", False, round(latency["encoder"], 4), "tier 1 (hashed)",
                      round(latency["hashed"], 4), goal=None, texts=len(latency_texts), batch=1, **common))
    write_result(NAME, out)


if __name__ == "__main__":
    main()
