"""Passkey retrieval at 1x, 2x and 4x the training context: RoPE, RoPE + linear/NTK/YaRN scaling, ALiBi, sink cache.

Two tiny models (RoPE and ALiBi, otherwise identical) are trained for a fixed number of steps on passkey
documents that fit their training context (loss on every token, the 5 answer digits weighted 10x: they are
5 of ~90 tokens and the only ones that need retrieval). Then lmstack.eval.tasks.long_context.passkey_table
scores every variant: the true 5-digit key ranked by log-likelihood against 4 random keys (chance = 0.2),
needle at depths 0.1 / 0.5 / 0.9. The baseline is chance; ratio = accuracy / chance (> 1: it retrieves).

    python benchmarks/long_context.py                      # ~5 min on 2 idle CPU cores
    python benchmarks/long_context.py --steps 100 --n 4    # a quick look
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F
from _common import RESULTS, result, write_result

import lmstack
from lmstack.world.passkey import make_passkey_document
from lmstack.eval.tasks.long_context import PasskeyTask, passkey_table
from lmstack.model.config import ModelConfig
from lmstack.tokenizer import train_tokenizer


def training_texts(n: int, max_chars: int, seed: int) -> list[str]:
    """Passkey documents in the eval's prompt format, answer included, short enough for the context."""
    rng = random.Random(seed)
    task = PasskeyTask()
    texts = []
    for _ in range(n):
        rec = make_passkey_document(rng, rng.randint(min(80, max_chars), max_chars), "chars", rng.random(), "repeat")
        texts.append(task.doc_to_text({"text": rec["text"], "question": rec["question"]}) + f" {rec['answer']}.")
    return texts


def train(model, seqs: list[list[int]], pad: int, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0
          ) -> list[float]:
    """AdamW on whole documents (right-padded), answer digits weighted 10x; returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        docs = rng.sample(seqs, batch)
        n = max(map(len, docs)) - 1
        x = torch.full((batch, n), pad)
        y = torch.full((batch, n), -100)
        w = torch.ones(batch, n)
        for i, d in enumerate(docs):
            x[i, :len(d) - 1], y[i, :len(d) - 1] = torch.tensor(d[:-1]), torch.tensor(d[1:])
            w[i, len(d) - 8:len(d) - 3] = 10.0  # targets of the 5 answer digits (before "." and EOS)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30)
        per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100)
        weight = w.flatten() * (y.flatten() != -100)
        loss = (per_token * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=96, help="training context (tokens)")
    ap.add_argument("--steps", type=int, default=400, help="training steps per model")
    ap.add_argument("--n", type=int, default=8, help="documents per (length, depth) cell")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()

    # Digits split one per token, so a key is 5 tokens whatever the merges learned.
    probe = training_texts(400, 2000, seed=99)
    tok = train_tokenizer(texts=probe, type="bpe", vocab_size=500, split_digits=True, special_tokens="chat",
                          show_progress=False)
    chars_per_token = sum(map(len, probe)) / sum(len(tok.encode(t)) for t in probe)
    bos, eos = tok.special_id("bos"), tok.special_id("eos")
    seqs = [[bos] + tok.encode(t) + [eos] for t in training_texts(8000, int(args.ctx * chars_per_token * 0.75), 0)]
    seqs = [s for s in seqs if len(s) <= args.ctx + 1]

    base = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=args.ctx,
                       mlp="swiglu", norm="rmsnorm", position="rope")
    models, train_log = {}, {}
    for position in ("rope", "alibi"):
        torch.manual_seed(0)
        model = lmstack.Transformer(base.replace(position=position))
        t = time.perf_counter()
        losses = train(model, seqs, eos, args.steps)
        tail = losses[-20:]
        train_log[position] = {"steps": len(losses), "first_loss": round(losses[0], 3),
                               "final_loss": round(sum(tail) / len(tail), 3), "seconds": round(time.perf_counter() - t)}
        print(f"{position}: {train_log[position]}", flush=True)
        models[position] = (model, tok)

    table = passkey_table(models, multiples=(1, 2, 4), depths=(0.1, 0.5, 0.9), n_per_cell=args.n,
                          rope_scalings=("linear", "ntk", "yarn"), sink=True)
    print(table["markdown"])
    (RESULTS / "long_context.md").write_text(table["markdown"])

    cfg = {"train_ctx": args.ctx, "train_steps": args.steps, "n_per_cell": args.n, "model": "d64 L2 H4 swiglu",
           "scoring": "rank the true key among 5 by log-likelihood", "training": train_log,
           "total_seconds": round(time.perf_counter() - start, 1)}
    out = []
    for name, v in table["variants"].items():
        for row in v["rows"]:
            out.append(result("long_context", f"passkey_acc[{name}, {row['multiple']}x ctx]", True, row["mean"],
                              "chance (uniform over 5 keys)", table["chance"], goal=None,
                              prompt_tokens=row["tokens"], by_depth=row["scores"], **cfg))
    write_result("long_context", out)
    print(json.dumps(train_log))


if __name__ == "__main__":
    main()
