"""Compressive Transformer memory (model/memory/compressive.py) against Transformer-XL memories (xl.py).

Task: copy2 from benchmarks/xl_memory.py (imported): streams of 4 segments of SEG tokens alternating A B A B,
so every scored token repeats the one two segments back. Arms, the same tiny 2-layer model (same init, same
batches, same steps), trained segment by segment:
- xl (the baseline): Transformer-XL with mem_len = SEG. The token it needs is 2*SEG back, out of its memory
  (xl_memory.py measures that the relay through layer 2 is not learned);
- compressive (ours): the same mem_len = SEG plus a compressed memory of SEG / rate slots, rate 2 or 4,
  compression by a strided convolution (learned from the attention-reconstruction loss only, at its own
  learning rate COMPRESSOR_LR = LR / 30; one arm trains it at the model's LR instead) or mean pooling;
- xl_upper: Transformer-XL with mem_len = SEG + SEG (the uncompressed states the compressed memory stands
  for): the upper bound, at `rate` times the extra memory.
Metrics: next-token accuracy on held-out streams (n scored tokens pooled over seeds, stderr = sqrt(p(1-p)/n);
per-seed accuracies beside it); memory slots per layer (arithmetic: mem_len + cmem_len) and the memory state's
bytes per row; training tokens/s; peak resident memory of one training step, each arm in a fresh process (CPU
RSS above the start); the attention-reconstruction loss on the held-out streams (compressive arms).

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/compressive_memory.py          # a few minutes on 2 busy cores
    python benchmarks/compressive_memory.py --quick             # a smoke run: prints, writes nothing (as does --arms)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch

from _common import peak_and_seconds, result, write_result
from xl_memory import BATCH, SEG, VOCAB, stream

from lmstack.model import ModelConfig, Transformer
from lmstack.model.memory.compressive import CompressiveMemory, attach_compressor, compressive_forward
from lmstack.model.memory.xl import XLMemory, xl_forward

NAME = "compressive_memory"
TASK, LAYERS, D_MODEL = "copy2", 2, 64

LR = 3e-3
COMPRESSOR_LR = 1e-4  # the compressor's own, lower rate: at the model's, Adam's steps move it faster than the
                      # model can learn to read it (the arm compressive_conv_r2_lr3e-3 measures that)

# arm -> (kind, mem_len, cmem_len, rate, fn, compressor learning rate)
ARMS = {
    "xl_mem16": ("xl", SEG, 0, 1, None, None),
    "compressive_conv_r2": ("compressive", SEG, SEG // 2, 2, "conv", COMPRESSOR_LR),
    "compressive_conv_r2_lr3e-3": ("compressive", SEG, SEG // 2, 2, "conv", LR),
    "compressive_mean_r2": ("compressive", SEG, SEG // 2, 2, "mean", None),
    "compressive_conv_r4": ("compressive", SEG, SEG // 4, 4, "conv", COMPRESSOR_LR),
    "compressive_mean_r4": ("compressive", SEG, SEG // 4, 4, "mean", None),
    "xl_upper_mem32": ("xl", 2 * SEG, 0, 1, None, None),
}


def build(arm: str, seed: int):
    """(model, run(ids, targets) -> (logits, loss), fresh memory) for one arm; the same init for every arm."""
    kind, mem_len, cmem_len, rate, fn, _ = ARMS[arm]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=LAYERS, n_heads=4, n_kv_heads=2,
                                    max_seq_len=3 * SEG, qkv_bias=True))
    if kind == "xl":
        return model, (lambda ids, targets: xl_forward(model, ids, SEG, mem_len, targets=targets)), \
            (lambda: XLMemory(model, mem_len))
    attach_compressor(model, fn=fn, rate=rate)
    new = lambda: CompressiveMemory(model, mem_len, cmem_len, rate)  # noqa: E731
    return model, (lambda ids, targets: compressive_forward(model, ids, SEG, targets=targets, memory=new())), new


def train_and_eval(arm: str, steps: int, eval_rows: int, seed: int) -> dict:
    model, run, new_memory = build(arm, seed)
    compressor = list(model.cmem_compress.parameters()) if hasattr(model, "cmem_compress") else []
    own = {id(p) for p in compressor}
    groups = [{"params": [p for p in model.parameters() if id(p) not in own], "lr": LR}]
    if compressor:
        groups.append({"params": compressor, "lr": ARMS[arm][5]})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1 + 100 * seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        ids, targets, _ = stream(TASK, BATCH, gen)
        _, loss = run(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    ids, targets, _ = stream(TASK, eval_rows, torch.Generator().manual_seed(2 + 100 * seed))
    with torch.no_grad():
        logits, _ = run(ids, targets)
        memory = new_memory()  # the state one row carries once full: run a whole stream through it
        with memory.attach():
            for segment in ids[:1].split(SEG, dim=1):
                model(segment, cache=memory)
        row_bytes = memory.nbytes()
    recon = None
    if hasattr(model, "cmem_compress"):  # the attention-reconstruction loss on held-out streams
        _, mem_len, cmem_len, rate = ARMS[arm][:4]
        memory, losses = CompressiveMemory(model, mem_len, cmem_len, rate, recon_loss=True), []
        with torch.no_grad(), memory.attach():
            for segment in ids.split(SEG, dim=1):
                model(segment, cache=memory)
                losses.append(float(memory.aux_loss.detach()) / model.config.cmem_loss_coef)
        recon = sum(losses[1:]) / (len(losses) - 1)  # segments 2..4 compress; the first has nothing to
    scored = targets != -100
    hits = int((logits.argmax(-1)[scored] == targets[scored]).sum())
    return {"hits": hits, "n": int(scored.sum()), "train_seconds": seconds, "recon_loss": recon,
            "tokens_per_s": steps * BATCH * ids.shape[1] / seconds, "memory_bytes_per_row": row_bytes}


def peak_step(arm: str) -> dict:
    """Seconds and peak memory (MB) of one training step (forward + backward over one batch of streams)."""
    model, run, _ = build(arm, 0)
    ids, targets, _ = stream(TASK, BATCH, torch.Generator().manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        run(ids, targets)[1].backward()

    return peak_and_seconds(step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-rows", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=2, help="independent inits and data streams per arm, pooled")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # child mode: one arm's training-step peak, as JSON
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peak_of:
        print(json.dumps(peak_step(args.peak_of)))
        return
    if args.quick:
        args.steps, args.eval_rows, args.seeds = 60, 64, 1
    partial = args.quick or args.arms != ",".join(ARMS)  # smoke runs and subsets print, keep the recorded results
    rows = {}
    for arm in args.arms.split(","):
        kind, mem_len, cmem_len, rate, fn, compressor_lr = ARMS[arm]
        runs = [train_and_eval(arm, args.steps, args.eval_rows, seed) for seed in range(args.seeds)]
        # the peak in a fresh process: in this one the allocator would hand a later arm the earlier one's pages
        child = subprocess.run([sys.executable, __file__, "--peak-of", arm], check=True, capture_output=True, text=True)
        peak = json.loads(child.stdout.strip().splitlines()[-1])
        n = sum(r["n"] for r in runs)
        acc = sum(r["hits"] for r in runs) / n
        rows[arm] = dict(accuracy=round(acc, 4), n=n, stderr=round(math.sqrt(acc * (1 - acc) / n), 4),
                         per_seed=[round(r["hits"] / r["n"], 4) for r in runs], kind=kind, mem_len=mem_len,
                         cmem_len=cmem_len, rate=rate, fn=fn, compressor_lr=compressor_lr,
                         slots_per_layer=mem_len + cmem_len,
                         reach_per_layer=mem_len + cmem_len * rate,
                         memory_bytes_per_row=runs[0]["memory_bytes_per_row"],
                         recon_loss=None if runs[0]["recon_loss"] is None else
                         round(sum(r["recon_loss"] for r in runs) / len(runs), 6),
                         tokens_per_s=round(sum(r["tokens_per_s"] for r in runs) / len(runs), 1),
                         peak_step_mb=round(peak["peak_mb"], 2))
        print(arm, rows[arm], flush=True)
    common = dict(task=TASK, n_layers=LAYERS, d_model=D_MODEL, seg_len=SEG, vocab=VOCAB, steps=args.steps,
                  batch=BATCH, lr=LR, seeds=args.seeds, chance=round(1 / VOCAB, 4), device="cpu")
    base, upper = rows.get("xl_mem16"), rows.get("xl_upper_mem32")
    out = []
    for arm, row in rows.items():
        if row["kind"] != "compressive":
            continue
        if base:
            out.append(result(f"{NAME}_{arm}_accuracy", "accuracy", True, row["accuracy"],
                              "Transformer-XL mem_len=16 (same mem_len, no compressed memory)", base["accuracy"],
                              goal=2.0, n=row["n"], stderr=row["stderr"], baseline_stderr=base["stderr"],
                              arms=rows, **common))
            out.append(result(f"{NAME}_{arm}_tokens_per_s", "train_tokens_per_s", True, row["tokens_per_s"],
                              "Transformer-XL mem_len=16", base["tokens_per_s"], **common))
        if upper:
            out.append(result(f"{NAME}_{arm}_vs_upper", "accuracy", True, row["accuracy"],
                              "Transformer-XL mem_len=32 (uncompressed upper bound)", upper["accuracy"],
                              n=row["n"], stderr=row["stderr"], baseline_stderr=upper["stderr"],
                              slots_per_layer=row["slots_per_layer"], upper_slots_per_layer=upper["slots_per_layer"],
                              **common))
            out.append(result(f"{NAME}_{arm}_memory_slots", "memory_slots_per_layer", False, row["slots_per_layer"],
                              "Transformer-XL mem_len=32 (the same reach uncompressed)", upper["slots_per_layer"],
                              reach_per_layer=row["reach_per_layer"], memory_bytes_per_row=row["memory_bytes_per_row"],
                              upper_memory_bytes_per_row=upper["memory_bytes_per_row"],
                              peak_step_mb=row["peak_step_mb"],
                              upper_peak_step_mb=upper["peak_step_mb"], **common))
    if partial:
        return
    write_result(NAME, out)


if __name__ == "__main__":
    main()
