"""Hierarchical attention (HAN-style, two Transformer levels) vs flat encoders on long documents (issue 22 XI.7).

Two tasks, both seeded generators in lmstack.model.hierarchical, documents of `chunks` chunks of `chunk` tokens:
- classification (make_documents): one bio, placed uniformly, starts with a SUBJECT marker and holds topic
  words of the document's class; `distractors` other bios hold topic words of other classes. Metric: accuracy.
- QA (make_qa): every chunk is the bio of a different entity stating the same relations; the question is
  (entity, relation). Metrics: evidence accuracy (the chunk that answers) and span exact match (start and end
  of the answer's value words both right).

Models (each task), trained the same steps, batch, schedule and lr grid:
- ours: HierarchicalClassifier / HierarchicalQA: chunks through a 2-layer bidirectional encoder (for QA the
  question's tokens are prepended to every chunk), attention pooled, a 1-layer encoder over the chunk summaries;
- flat_truncated (the baseline): a 3-layer bidirectional encoder of about the same parameter count over the
  first `context` tokens (what a fixed-context model does with a longer document);
- flat_full: the same flat encoder over the whole document (O(n^2) attention).

Fairness: every model gets the same tuning budget, one full run per learning rate in --lrs; the lr is picked by
accuracy on a validation set (seed 2) and the test set (seed 1) is scored once. Validation accuracy is logged
every --eval-every steps (the `curve` of each model), so a reader can see whether a model was still learning.

Throughput: after training, each model's train step (forward + backward + AdamW) is timed back to back in this
process, round-robin over the models, median over rounds; the machine is shared, so os.getloadavg() is
recorded before and after. Peak memory of one train step: each model in a fresh process (CUDA: max allocated;
CPU: peak RSS above the start of the step).

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py   # the recorded run: ~11 min, 2 busy cores
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py --steps 100 --qa-steps 100 --lrs 3e-3
    python benchmarks/hierarchical_attention.py --device cuda --chunks 64 --context 512   # longer documents
    flock /tmp/lmstack-bench.lock python benchmarks/hierarchical_attention.py --long-run 1200 --lrs 1e-3
        # then: does flat_full catch up on classification with many more steps? (adds accuracy_vs_full_long_run)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _common import RESULTS, peak_and_seconds, result, write_result

from lmstack.model.config import ModelConfig
from lmstack.model.hierarchical import (FlatClassifier, FlatQA, HierarchicalClassifier, HierarchicalQA,
                                        make_documents, make_qa)

NAME = "hierarchical_attention"
QUESTION_LEN = 2
MODELS = ("hierarchical", "flat_truncated", "flat_full")


def builders(args) -> dict:
    """{task: {model name: () -> module}}."""
    base = ModelConfig(vocab_size=args.vocab, d_model=64, n_heads=4, mlp="swiglu", position="rope")
    c, n, ctx, length, q = args.chunk, args.chunks, args.context, args.chunks * args.chunk, QUESTION_LEN
    tok, doc = base.replace(n_layers=2), base.replace(n_layers=1, max_seq_len=n)
    flat = base.replace(n_layers=3)
    return {
        "classify": {
            "hierarchical": lambda: HierarchicalClassifier(tok.replace(max_seq_len=c), doc, c, args.classes),
            "flat_truncated": lambda: FlatClassifier(flat.replace(max_seq_len=ctx), args.classes, context=ctx),
            "flat_full": lambda: FlatClassifier(flat.replace(max_seq_len=length), args.classes, context=length),
        },
        "qa": {
            "hierarchical": lambda: HierarchicalQA(tok.replace(max_seq_len=c + q), doc, c, question_len=q),
            "flat_truncated": lambda: FlatQA(flat.replace(max_seq_len=ctx + q), c, q, context=ctx),
            "flat_full": lambda: FlatQA(flat.replace(max_seq_len=length + q), c, q, context=length),
        },
    }


def datasets(args, task: str, n: int, seed: int) -> dict:
    """A task's examples as a dict of tensors with a shared first dimension."""
    if task == "classify":
        ids, labels = make_documents(n, args.chunks, args.chunk, args.classes, args.vocab, seed=seed,
                                     distractors=args.distractors, device=args.device)
        return {"ids": ids, "labels": labels}
    return make_qa(n, args.chunks, args.chunk, args.vocab, n_relations=args.relations, seed=seed,
                   device=args.device)._asdict()


def loss_of(task: str, model, batch: dict) -> torch.Tensor:
    if task == "classify":
        return F.cross_entropy(model(batch["ids"]), batch["labels"])
    return model(batch["questions"], batch["ids"]).loss(batch["evidence"], batch["start"], batch["end"])


def take(data: dict, index) -> dict:
    return {k: v[index] for k, v in data.items()}


@torch.no_grad()
def score(task: str, model, data: dict, batch: int = 100) -> dict:
    """{metric: (p, stderr, n)}: accuracy, or evidence accuracy and span exact match."""
    model.eval()
    hits: dict[str, list] = {}
    n = len(data["ids"])
    for i in range(0, n, batch):
        b = take(data, slice(i, i + batch))
        if task == "classify":
            hits.setdefault("accuracy", []).append(model(b["ids"]).argmax(-1) == b["labels"])
        else:
            out = model(b["questions"], b["ids"])
            hits.setdefault("evidence_accuracy", []).append(out.evidence.argmax(-1) == b["evidence"])
            hits.setdefault("span_exact_match", []).append((out.start.argmax(-1) == b["start"])
                                                           & (out.end.argmax(-1) == b["end"]))
    model.train()
    out = {}
    for k, v in hits.items():
        p = torch.cat(v).float().mean().item()
        out[k] = (p, math.sqrt(p * (1 - p) / n), n)
    return out


def train(task: str, model, data: dict, val: dict, args, lr: float, steps: int) -> list:
    """AdamW, linear warmup + cosine to 0.1x, grad clip 1; returns the validation curve [(step, metric)]."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(0)
    key = "accuracy" if task == "classify" else "span_exact_match"
    curve = []
    model.train()
    for s in range(1, steps + 1):
        loss = loss_of(task, model, take(data, torch.randint(0, len(data["ids"]), (args.batch,), generator=g)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if s % args.eval_every == 0 or s == steps:
            curve.append((s, round(score(task, model, val)[key][0], 4)))
    return curve


def step_seconds(task: str, models: dict, data: dict, args, rounds: int = 5, per_round: int = 3) -> dict:
    """Median seconds of one train step per model, timed round-robin so load drift hits every model alike."""
    batch = take(data, slice(0, args.batch))
    opts = {name: torch.optim.AdamW(m.parameters(), 0.0) for name, m in models.items()}  # lr 0: same work, no drift
    times: dict[str, list] = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, m in models.items():
            for _ in range(per_round):
                start = time.perf_counter()
                loss_of(task, m, batch).backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def peak_step(task: str, model, batch: dict, device: str) -> dict:
    """Seconds and peak memory (MB) of one forward + backward (the gradients are thrown away)."""
    def step():
        model.zero_grad(set_to_none=True)
        loss_of(task, model, batch).backward()
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


def run_task(task: str, args, steps: int) -> dict:
    build = builders(args)[task]
    data, val, test = (datasets(args, task, n, seed) for n, seed in ((args.n_train, 0), (args.n_val, 2),
                                                                      (args.n_test, 1)))
    key = "accuracy" if task == "classify" else "span_exact_match"
    rows, trained = {}, {}
    for name in MODELS:
        tried = {}
        for lr in args.lrs:
            torch.manual_seed(0)
            model = build[name]().to(args.device)
            curve = train(task, model, data, val, args, lr, steps)
            tried[lr] = (score(task, model, val)[key][0], curve, model)
            print(f"{task} {name} lr={lr:g} val {key}={tried[lr][0]:.3f} curve={curve}", flush=True)
        lr = max(tried, key=lambda k: tried[k][0])  # ties go to the first lr of the grid
        trained[name] = tried[lr][2]
        test_scores = score(task, trained[name], test)
        rows[name] = dict(lr=lr, val={f"{k:g}": v[0] for k, v in tried.items()}, curve=tried[lr][1],
                          params=sum(p.numel() for p in trained[name].parameters()),
                          tokens_seen=min(args.chunks * args.chunk, getattr(trained[name], "context", 1 << 30)),
                          **{k: v[0] for k, v in test_scores.items()},
                          **{f"{k}_stderr": v[1] for k, v in test_scores.items()}, n=args.n_test)
        print(task, name, {k: v for k, v in rows[name].items() if k != "curve"}, flush=True)
    load_before = os.getloadavg()
    secs = step_seconds(task, trained, data, args)
    load_after = os.getloadavg()
    length = args.chunks * args.chunk
    for name, sec in secs.items():
        rows[name].update(step_seconds=sec, doc_tokens_per_s=args.batch * length / sec,
                          tokens_per_s=args.batch * rows[name]["tokens_seen"] / sec)
    return dict(rows=rows, loadavg_before_timing=load_before, loadavg_after_timing=load_after)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--context", type=int, default=64, help="the truncated flat models' context")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--relations", type=int, default=3, help="QA: relations each bio states")
    ap.add_argument("--steps", type=int, default=400, help="classification train steps per lr")
    ap.add_argument("--qa-steps", type=int, default=700, help="QA train steps per lr")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                    help="the lr grid every model gets")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--tasks", nargs="+", default=["classify", "qa"], choices=["classify", "qa"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long-run", type=int, default=0,
                    help="instead: hierarchical vs flat_full classification for this many steps (first lr of --lrs), "
                         "merged into the results file as accuracy_vs_full_long_run")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # child mode: "task:model" -> its train-step peak, as JSON
    args = ap.parse_args()
    if args.peak_of:
        task, name = args.peak_of.split(":")
        torch.manual_seed(0)
        model = builders(args)[task][name]().to(args.device)
        batch = take(datasets(args, task, args.batch, 0), slice(None))
        print(json.dumps(peak_step(task, model, batch, args.device)))
        return
    if args.long_run:
        long_run(args)
        return
    torch.manual_seed(0)
    length = args.chunks * args.chunk
    config = dict(device=args.device, doc_tokens=length, chunk=args.chunk, chunks=args.chunks, context=args.context,
                  batch=args.batch, lrs=args.lrs, n_train=args.n_train, n_val=args.n_val,
                  threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine="shared: other jobs ran on the same cores (see loadavg)")
    out = []
    for task in args.tasks:
        steps = args.steps if task == "classify" else args.qa_steps
        got = run_task(task, args, steps)
        rows = got.pop("rows")
        for name in MODELS:  # each peak in a fresh process: in this one the allocator would reuse earlier pages
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-of", f"{task}:{name}"],
                                   check=True, capture_output=True, text=True)
            rows[name]["peak_mb"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]
        h, t, f = (rows[name] for name in MODELS)
        cfg = dict(config, task=task, steps=steps, models=rows, **got)
        if task == "classify":
            cfg.update(classes=args.classes, distractors=args.distractors, chance=1 / args.classes)
            metrics, prefix = ["accuracy"], ""
        else:
            cfg.update(relations=args.relations, question="prepended to every chunk (hierarchical) / to the "
                       "document (flat)", chance_evidence=1 / args.chunks,
                       truncated_evidence_ceiling=min(1.0, math.ceil(args.context / args.chunk) / args.chunks))
            metrics, prefix = ["evidence_accuracy", "span_exact_match"], "qa_"
        for metric in metrics:
            for base_name, b, extra in (("flat_truncated", t, cfg), ("flat_full", f, dict(task=task, device=args.device,
                                                                                             doc_tokens=length))):
                suffix = "" if base_name == "flat_truncated" else "_vs_full"
                out.append(result(NAME, f"{prefix}{metric}{suffix}", True, h[metric], base_name, b[metric],
                                  goal=1.0, n=args.n_test, stderr=h[f"{metric}_stderr"],
                                  baseline_stderr=b[f"{metric}_stderr"], **extra))
        for base_name, b in (("flat_truncated", t), ("flat_full", f)):
            suffix = "" if base_name == "flat_truncated" else "_vs_full"
            out.append(result(NAME, f"{prefix}doc_tokens_per_s{suffix}", True, h["doc_tokens_per_s"], base_name,
                              b["doc_tokens_per_s"], goal=1.0 if suffix else None, task=task, device=args.device,
                              doc_tokens=length, context=args.context, timing="back to back, round-robin",
                              **got))
            out.append(result(NAME, f"{prefix}peak_train_step_mb{suffix}", False, h["peak_mb"], base_name,
                              b["peak_mb"], goal=1.0 if suffix else None, task=task, device=args.device,
                              batch=args.batch, doc_tokens=length, context=args.context))
    save(out)


def save(out: list) -> None:
    """write_result, then a strict-JSON fix: a baseline at 0 gives an infinite ratio, written as null."""
    for r in out:
        r["ratio"] = math.inf if r["ratio"] is None else r["ratio"]
    path = write_result(NAME, out)
    if any(math.isinf(r["ratio"]) for r in out):
        for r in out:
            r["ratio"] = None if math.isinf(r["ratio"]) else r["ratio"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, path)


def long_run(args) -> None:
    """Classification, hierarchical vs flat_full only, for --long-run steps at the first lr of --lrs: does the flat
    model over the whole document catch up given many more steps? Merged into the existing results file."""
    task, build = "classify", builders(args)["classify"]
    data, val, test = (datasets(args, task, n, seed) for n, seed in ((args.n_train, 0), (args.n_val, 2),
                                                                      (args.n_test, 1)))
    rows = {}
    start = time.perf_counter()
    for name in ("hierarchical", "flat_full"):
        torch.manual_seed(0)
        model = build[name]().to(args.device)
        curve = train(task, model, data, val, args, args.lrs[0], args.long_run)
        p, err, n = score(task, model, test)["accuracy"]
        rows[name] = dict(accuracy=p, accuracy_stderr=err, n=n, curve=curve)
        print(task, name, rows[name], flush=True)
    h, f = rows["hierarchical"], rows["flat_full"]
    entry = result(NAME, "accuracy_vs_full_long_run", True, h["accuracy"], "flat_full", f["accuracy"], goal=1.0,
                   n=args.n_test, stderr=h["accuracy_stderr"], baseline_stderr=f["accuracy_stderr"], task=task,
                   device=args.device, doc_tokens=args.chunks * args.chunk, steps=args.long_run, lr=args.lrs[0],
                   batch=args.batch, models=rows, minutes=round((time.perf_counter() - start) / 60, 1))
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    save([r for r in old if r["metric"] != entry["metric"]] + [entry])

if __name__ == "__main__":
    main()
