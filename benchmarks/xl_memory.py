"""Transformer-XL memory (model/memory/xl.py) against the same model run segment-local (no memory).

Two tasks made here, on streams cut into segments of SEG tokens; only tokens after the first segment(s)
are scored, and each is predictable only from an earlier segment:
- copy1: every segment repeats the one before (one random segment, repeated). mem_len = SEG reaches it.
- copy2: segments alternate A B A B ...: each repeats the segment two back. mem_len = 2*SEG holds it.
  With mem_len = SEG, a 2-layer model could in principle relay it (layer 2's memory holds layer-1 outputs of
  the previous segment, which read the one before: the reach grows to n_layers * mem_len), but the memory is
  detached, so no gradient ever asks the previous segment's layer 1 to carry A forward; this arm measures
  whether the relay is learned anyway (it is not, much: the price of the stop-gradient).
Each arm trains the same tiny model (same init, same batches) with xl_forward; the metric is next-token
accuracy on held-out streams (n scored tokens, stderr = sqrt(p(1-p)/n)). Baseline: mem_len = 0, i.e. each
segment alone, what a plain model trained on SEG-token windows sees.

Usage:
    python benchmarks/xl_memory.py            # about a minute on 2 shared cores
    python benchmarks/xl_memory.py --quick
"""
from __future__ import annotations

import math
import sys
import time

import torch

from _common import result, write_result

from lmstack.model import ModelConfig, Transformer
from lmstack.model.memory import xl_forward

SEG, VOCAB, BATCH = 16, 64, 32


def stream(task: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, targets, scored per row): 4 segments of SEG tokens; targets before the reach are -100."""
    period = 1 if task == "copy1" else 2
    base = torch.randint(0, VOCAB, (n, period * SEG), generator=gen)
    full = base.repeat(1, 4 // period + 1)[:, :4 * SEG + 1]
    ids, targets = full[:, :-1], full[:, 1:].clone()
    targets[:, :period * SEG - 1] = -100  # the first `period` segments' next tokens are random
    return ids, targets, int((targets[0] != -100).sum())


def train_and_eval(task: str, n_layers: int, mem_len: int, steps: int, eval_rows: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                    max_seq_len=3 * SEG, qkv_bias=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        ids, targets, _ = stream(task, BATCH, gen)
        _, loss = xl_forward(model, ids, seg_len=SEG, mem_len=mem_len, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    ids, targets, _ = stream(task, eval_rows, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = xl_forward(model, ids, seg_len=SEG, mem_len=mem_len, targets=targets)
    scored = targets != -100
    n = int(scored.sum())
    acc = float((logits.argmax(-1)[scored] == targets[scored]).float().mean())
    return {"acc": acc, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n), "loss": float(loss),
            "train_seconds": round(seconds, 2)}


def main(quick: bool = False) -> None:
    torch.set_num_threads(1)
    steps, eval_rows = (60, 64) if quick else (300, 256)
    results = []
    for task, layers, mem_len in (("copy1", 1, SEG), ("copy1", 2, SEG), ("copy2", 1, 2 * SEG), ("copy2", 2, SEG)):
        xl = train_and_eval(task, layers, mem_len, steps, eval_rows)
        local = train_and_eval(task, layers, 0, steps, eval_rows)
        print(task, layers, mem_len, "xl", xl, "no memory", local)
        config = dict(task=task, n_layers=layers, seg_len=SEG, mem_len=mem_len, vocab=VOCAB, d_model=64, steps=steps,
                      batch=BATCH, n=xl["n"], stderr=round(xl["stderr"], 4),
                      baseline_stderr=round(local["stderr"], 4), loss=round(xl["loss"], 4),
                      baseline_loss=round(local["loss"], 4), chance=round(1 / VOCAB, 4),
                      train_seconds=xl["train_seconds"], baseline_train_seconds=local["train_seconds"])
        # goal: where mem_len covers the distance; the relay arm (copy2, mem_len = SEG) is a measured limitation
        goal = 2.0 if mem_len >= SEG * (1 if task == "copy1" else 2) else None
        results.append(result(f"xl_memory_{task}_{layers}l_mem{mem_len}", "accuracy", True, round(xl["acc"], 4),
                              "same model, segment-local (mem_len=0)", round(local["acc"], 4), goal=goal, **config))
    write_result("xl_memory", results)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
