"""Context extension by fine-tuning: position interpolation and YaRN, with and without a short fine-tune at 4x.

The base model is long_context.py's tiny RoPE model, trained the same way on passkey documents that fit its
context L. Then, for each of linear position interpolation (factor 4) and YaRN (factor 4), a copy with
max_seq_len 4L is fine-tuned for a short budget on passkey documents of up to 4L tokens, and passkey accuracy
is measured at 1x / 2x / 4x L. Two comparisons per cell:
  (a) the same scaling applied at inference only (no fine-tune) -- does the fine-tune recover accuracy?
  (b) plain RoPE fine-tuned for the same steps on the same 4L documents -- does the scaling matter once
      you fine-tune? (the fair baseline: any model improves when it sees long documents)
Scoring is long_context.py's: the true 5-digit key ranked by log-likelihood against 4 random keys (chance 0.2),
needles at depths 0.1 / 0.5 / 0.9; every accuracy carries n and its binomial stderr.

    python benchmarks/context_extension.py      # the recorded run: 3 min on 2 idle cores, ~10 min loaded
    python benchmarks/context_extension.py --steps 40 --ft-steps 10 --n 2   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from _common import RESULTS, result
from long_context import train, training_texts

import lmstack
from lmstack.eval.tasks.long_context import passkey_table
from lmstack.model.config import ModelConfig
from lmstack.model.positions import RotaryEmbedding
from lmstack.tokenizer import train_tokenizer

FACTOR = 4


def extended(model, kind: str, ctx: int):
    """A copy of the base model with max_seq_len FACTOR*ctx and rotary tables for `kind` ("none" keeps RoPE)."""
    ext = copy.deepcopy(model)
    cfg = model.config.replace(max_seq_len=FACTOR * ctx)
    if kind != "none":
        cfg = cfg.replace(rope_scaling=kind, rope_factor=float(FACTOR), rope_original_max_seq_len=ctx)
    ext.config = cfg
    ext.rope = RotaryEmbedding(cfg)
    return ext


def for_eval(model, ctx: int):
    """passkey_table measures multiples of config.max_seq_len; report them against the base context L.

    Only the config's label changes: the rotary tables (built from rope_original_max_seq_len and the
    factor, not max_seq_len) stay those the model was fine-tuned with."""
    model.config = model.config.replace(max_seq_len=ctx)
    return model


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=96, help="base training context L (tokens)")
    ap.add_argument("--steps", type=int, default=400, help="base training steps (at context L)")
    ap.add_argument("--ft-steps", type=int, default=100, help="fine-tune steps at context 4L, per variant")
    ap.add_argument("--ft-batch", type=int, default=8, help="documents per fine-tune step")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tune peak learning rate")
    ap.add_argument("--n", type=int, default=32, help="documents per (length, depth) cell; 3 depths per length")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    L = args.ctx

    # The same tokenizer and base data as long_context.py (digits one per token).
    probe = training_texts(400, 2000, seed=99)
    tok = train_tokenizer(texts=probe, type="bpe", vocab_size=500, split_digits=True, special_tokens="chat",
                          show_progress=False)
    chars_per_token = sum(map(len, probe)) / sum(len(tok.encode(t)) for t in probe)
    bos, eos = tok.special_id("bos"), tok.special_id("eos")

    def docs(n: int, tokens: int, seed: int) -> list[list[int]]:
        seqs = [[bos] + tok.encode(t) + [eos] for t in training_texts(n, int(tokens * chars_per_token * 0.75), seed)]
        return [s for s in seqs if len(s) <= tokens + 1]

    base_seqs = docs(8000, L, 0)
    long_seqs = docs(3000, FACTOR * L, 1)  # passkey documents up to 4L: the fine-tune data, fresh keys

    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=L,
                      mlp="swiglu", norm="rmsnorm", position="rope")
    torch.manual_seed(0)
    base = lmstack.Transformer(cfg)
    t = time.perf_counter()
    losses = train(base, base_seqs, eos, args.steps)
    log = {"base": {"steps": args.steps, "ctx": L, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
                    "seconds": round(time.perf_counter() - t)}}
    print("base:", log["base"], flush=True)

    models = {"base": (base, tok)}
    for kind in ("none", "linear", "yarn"):
        torch.manual_seed(1)
        ext = extended(base, kind, L)
        t = time.perf_counter()
        losses = train(ext, long_seqs, eos, args.ft_steps, batch=args.ft_batch, lr=args.ft_lr, seed=1)
        name = f"ft-{'rope' if kind == 'none' else kind}"
        log[name] = {"steps": args.ft_steps, "ctx": FACTOR * L, "first_loss": round(losses[0], 3),
                     "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 3),
                     "seconds": round(time.perf_counter() - t)}
        print(f"{name}:", log[name], flush=True)
        models[name] = (for_eval(ext, L), tok)

    # base gives RoPE and the two inference-only scalings; the fine-tuned copies are measured as they are.
    # Both tables use the same task seed, so every variant sees the same prompts and keys (paired).
    grid = {"multiples": (1, 2, 4), "depths": (0.1, 0.5, 0.9), "n_per_cell": args.n, "sink": False}
    table = passkey_table({"base": models.pop("base")}, rope_scalings=("linear", "yarn"), **grid)
    tuned = passkey_table(models, rope_scalings=(), **grid)
    table["variants"].update(tuned["variants"])
    markdown = table["markdown"] + "\n" + tuned["markdown"]
    print(markdown)
    tmp = RESULTS / "context_extension.md.tmp"
    tmp.write_text(markdown)
    os.replace(tmp, RESULTS / "context_extension.md")

    n_cell = 3 * args.n
    acc = {}
    for vname, v in table["variants"].items():
        for row in v["rows"]:
            acc[(vname, row["multiple"])] = (row["mean"], row["tokens"], row["scores"])
    names = {"rope": "base: RoPE", "linear": "base: RoPE + linear x4", "yarn": "base: RoPE + yarn x4",
             "ft-rope": "ft-rope: RoPE", "ft-linear": "ft-linear: RoPE + linear x4", "ft-yarn": "ft-yarn: RoPE + yarn x4"}
    common = {"train_ctx": L, "base_steps": args.steps, "ft_steps": args.ft_steps, "ft_batch": args.ft_batch,
              "ft_lr": args.ft_lr, "ft_ctx": FACTOR * L, "factor": FACTOR, "n": n_cell, "model": "d64 L2 H4 swiglu",
              "scoring": "rank the true key among 5 by log-likelihood (chance 0.2)", "training": log,
              "total_seconds": round(time.perf_counter() - start, 1)}
    out = []
    for mult in (1, 2, 4):
        for kind in ("linear", "yarn"):
            ours, tokens, by_depth = acc[(names[f"ft-{kind}"], mult)]
            for ref, ref_label in ((kind, f"RoPE + {kind} x4, no fine-tune"),
                                   ("ft-rope", f"plain RoPE fine-tuned {args.ft_steps} steps at {FACTOR * L}")):
                base_acc = acc[(names[ref], mult)][0]
                r = result("context_extension", f"passkey_acc[{kind} x4 + fine-tune vs {ref_label}, {mult}x ctx]",
                           True, ours, ref_label, base_acc, goal=None, prompt_tokens=tokens, by_depth=by_depth,
                           stderr=round(stderr(ours, n_cell), 4), baseline_stderr=round(stderr(base_acc, n_cell), 4),
                           **common)
                out.append(r)
        # the plain RoPE pair, for the record: does fine-tuning alone help?
        ours, tokens, by_depth = acc[(names["ft-rope"], mult)]
        base_acc = acc[(names["rope"], mult)][0]
        out.append(result("context_extension", f"passkey_acc[RoPE + fine-tune vs RoPE, {mult}x ctx]", True, ours,
                          "plain RoPE, no fine-tune", base_acc, goal=None, prompt_tokens=tokens, by_depth=by_depth,
                          stderr=round(stderr(ours, n_cell), 4), baseline_stderr=round(stderr(base_acc, n_cell), 4),
                          **common))
    for r in out:
        if math.isinf(r["ratio"]):
            r["ratio"] = None  # a baseline at 0 has no finite ratio, and JSON has no Infinity
        print(f"{r['metric']}: {r['ours']:.3f} +- {r['config']['stderr']:.3f} vs {r['baseline']['value']:.3f} "
              f"+- {r['config']['baseline_stderr']:.3f} (n={n_cell})")
    path = RESULTS / "context_extension.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    print(json.dumps(log))


if __name__ == "__main__":
    main()
