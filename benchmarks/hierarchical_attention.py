"""Hierarchical attention (HAN-style, two Transformer levels) vs flat encoders on long-document classification.

Task (make_documents in lmstack.model.hierarchical, seeded): documents of `chunks` bios of `chunk` tokens; one
bio, placed uniformly, starts with a SUBJECT marker and holds topic words of the document's class; `distractors`
other bios hold topic words of other classes without the marker. The label is the marked bio's topic, so it
sits anywhere in the document, often past a flat model's context.

Models, all trained the same steps, batch and learning rate:
- ours: HierarchicalClassifier: chunks of `chunk` tokens through a 2-layer bidirectional encoder, attention
  pooled, then a 1-layer encoder over the chunk summaries, pooled again, a linear head;
- flat_truncated (the baseline): a 3-layer bidirectional encoder of about the same parameter count over the
  first `context` tokens (what a fixed-context model does with a longer document);
- flat_full: the same flat encoder over the whole document (O(n^2) attention), for reference.

Metrics: held-out accuracy (n documents, stderr sqrt(p(1-p)/n)), training tokens/s (document tokens the model
reads per second of forward + backward + step), peak memory of one training step, each model in a fresh process (CUDA: max
allocated; CPU: peak RSS above the start of the step).

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py \
        --chunks 16 --chunk 32 --context 128 --steps 200 --lr 3e-3 --n-test 500   # the recorded run, ~12 min on 2 busy cores
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py             # 1024-token documents, longer
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py --steps 60  # quicker, noisier
    python benchmarks/hierarchical_attention.py --device cuda --chunks 64                 # longer documents
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _common import peak_and_seconds, result, write_result

from lmstack.model.config import ModelConfig
from lmstack.model.hierarchical import FlatClassifier, HierarchicalClassifier, make_documents

NAME = "hierarchical_attention"


def peak_step(model, ids, labels, device: str) -> dict:
    """Seconds and peak memory (MB) of one forward + backward (the gradients are thrown away)."""
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ids), labels).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device != "cuda":
        out = peak_and_seconds(step)
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        out = {"seconds": time.perf_counter() - start, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    model.zero_grad(set_to_none=True)
    return out


def train(model, ids, labels, steps: int, batch: int, lr: float, device: str) -> float:
    """AdamW with linear warmup + cosine; returns the median seconds per step after the first few."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(0)
    times = []
    model.train()
    for s in range(steps):
        b = torch.randint(0, len(ids), (batch,), generator=g)
        start = time.perf_counter()
        loss = F.cross_entropy(model(ids[b]), labels[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if s >= 3:
            times.append(time.perf_counter() - start)
    model.eval()
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def accuracy(model, ids, labels, batch: int = 64) -> tuple[float, float]:
    hits = torch.cat([model(ids[i:i + batch]).argmax(-1) == labels[i:i + batch] for i in range(0, len(ids), batch)])
    p = hits.float().mean().item()
    return p, math.sqrt(p * (1 - p) / len(hits))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--context", type=int, default=256, help="the truncated flat model's context")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--no-full", action="store_true", help="skip the flat model over the whole document")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # child mode: one model's training-step peak, as JSON
    args = ap.parse_args()
    dev, length = args.device, args.chunks * args.chunk
    torch.manual_seed(0)
    data = dict(n_chunks=args.chunks, chunk_size=args.chunk, n_classes=args.classes, vocab_size=256,
                distractors=args.distractors, device=dev)
    ids, labels = make_documents(args.n_train, seed=0, **data)
    test_ids, test_labels = make_documents(args.n_test, seed=1, **data)

    base = ModelConfig(vocab_size=256, d_model=64, n_heads=4, mlp="swiglu", position="rope")
    models = {
        "hierarchical": lambda: HierarchicalClassifier(base.replace(n_layers=2, max_seq_len=args.chunk),
                                                       base.replace(n_layers=1, max_seq_len=args.chunks),
                                                       chunk_size=args.chunk, n_classes=args.classes),
        "flat_truncated": lambda: FlatClassifier(base.replace(n_layers=3, max_seq_len=args.context),
                                                 args.classes, context=args.context),
    }
    if not args.no_full:
        models["flat_full"] = lambda: FlatClassifier(base.replace(n_layers=3, max_seq_len=length),
                                                     args.classes, context=length)
    if args.peak_of:
        torch.manual_seed(0)
        print(json.dumps(peak_step(models[args.peak_of]().to(dev), ids[:args.batch], labels[:args.batch], dev)))
        return
    rows = {}
    for name, build in models.items():
        # Each peak in a fresh process: in this one the allocator would hand a later model the earlier one's pages.
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-of", name],
                               check=True, capture_output=True, text=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        torch.manual_seed(0)
        model = build().to(dev)
        seen = min(length, getattr(model, "context", length))
        sec = train(model, ids, labels, args.steps, args.batch, args.lr, dev)
        acc, err = accuracy(model, test_ids, test_labels)
        rows[name] = dict(accuracy=acc, stderr=err, n=args.n_test, tokens_per_s=args.batch * seen / sec,
                          doc_tokens_per_s=args.batch * length / sec, tokens_seen=seen, peak_mb=mem["peak_mb"],
                          params=sum(p.numel() for p in model.parameters()))
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()}, flush=True)

    h, t = rows["hierarchical"], rows["flat_truncated"]
    config = dict(device=dev, doc_tokens=length, chunk=args.chunk, chunks=args.chunks, context=args.context,
                  classes=args.classes, distractors=args.distractors, steps=args.steps, batch=args.batch,
                  lr=args.lr, n_train=args.n_train, chance=1 / args.classes, models=rows)
    out = [result(NAME, "accuracy", True, h["accuracy"], "flat_truncated", t["accuracy"], goal=1.0,
                  n=args.n_test, stderr=h["stderr"], baseline_stderr=t["stderr"], **config),
           result(NAME, "doc_tokens_per_s", True, h["doc_tokens_per_s"], "flat_truncated", t["doc_tokens_per_s"],
                  device=dev, doc_tokens=length, context=args.context),
           result(NAME, "peak_train_step_mb", False, h["peak_mb"], "flat_truncated", t["peak_mb"],
                  device=dev, batch=args.batch, doc_tokens=length, context=args.context)]
    if "flat_full" in rows:
        f = rows["flat_full"]
        out += [result(NAME, "accuracy_vs_full", True, h["accuracy"], "flat_full", f["accuracy"],
                       n=args.n_test, stderr=h["stderr"], baseline_stderr=f["stderr"], device=dev, doc_tokens=length),
                result(NAME, "doc_tokens_per_s_vs_full", True, h["doc_tokens_per_s"], "flat_full",
                       f["doc_tokens_per_s"], goal=1.0, device=dev, doc_tokens=length),
                result(NAME, "peak_train_step_mb_vs_full", False, h["peak_mb"], "flat_full", f["peak_mb"],
                       goal=1.0, device=dev, batch=args.batch, doc_tokens=length)]
    write_result(NAME, out)


if __name__ == "__main__":
    main()
