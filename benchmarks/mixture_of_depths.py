"""Mixture-of-Depths vs a dense model at equal training FLOPs (Raposo et al. 2024's isoFLOP comparison, tiny).

Both models have the same shape (llama-style, rope, swiglu); the MoD model routes every other block with
capacity 0.125. Its forward FLOPs per token are lower (mod_forward_flops, arithmetic), so at the same FLOP
budget it takes proportionally more steps of the same batch. Metric: held-out next-token loss on world texts
(val split), mean over n eval batches with the stderr across batches. The MoD model is scored twice:
with the causal threshold routing that sampling would use (the headline: top-k looks at future tokens), and
with top-k (the training rule). For reference the dense model is also trained for the MoD model's step
count (more FLOPs), and one forward + backward of each is timed back to back. Decoding: both models
generate with the contiguous KV cache (reference_decode, greedy, batch 1), back to back; the MoD model routes
by its causal predictor there, and the fraction of decoded tokens its routed blocks took is recorded (the
compute it saves depends on that fraction, not on the training capacity).

Usage:
    flock /tmp/lmstack-bench.lock python benchmarks/mixture_of_depths.py                # ~2-3 min on 2 CPU cores
    flock /tmp/lmstack-bench.lock python benchmarks/mixture_of_depths.py --dense-steps 60   # quicker, noisier
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from _common import result, timeit, write_result
from _tiny_lm import make_tokenizer, token_stream, world_texts

from lmstack.model import ModelConfig, Transformer
from lmstack.model.mixture_of_depths import mod_forward_flops
from lmstack.model.reference_decode import reference_decode


def batches(data: torch.Tensor, n: int, batch: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g).tolist()
        yield (torch.stack([data[i:i + seq_len] for i in idx]), torch.stack([data[i + 1:i + seq_len + 1] for i in idx]))


def train(model, data, steps: int, batch: int, seq_len: int, lr: float = 3e-3) -> float:
    """Step-based warmup + cosine to 10%, CE + model.aux_loss; returns seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(data, steps, batch, seq_len, seed=0)):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + model.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return (time.perf_counter() - start) / steps


def step_seconds(model, x, y) -> float:
    """Median seconds of one forward + backward on a fixed batch (no optimizer), training mode."""
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + model.aux_loss).backward()
    secs = timeit(step, repeat=7, warmup=2)
    model.eval()
    return secs


@torch.no_grad()
def evaluate(model, data, n: int, batch: int, seq_len: int) -> tuple[float, float]:
    """(mean held-out CE, stderr across the n batches)."""
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in batches(data, n, batch, seq_len, seed=123)]
    return statistics.mean(losses), statistics.stdev(losses) / math.sqrt(n)


def decode_tokens_per_s(model, prompt: torch.Tensor, n_new: int, repeats: int = 3) -> tuple[float, float]:
    """Greedy KV-cache decode of n_new tokens after prompt (1, T): (median tokens/s, fraction of decoded tokens
    the routed blocks processed; 1.0 for a dense model)."""
    routers = [b.router for b in model.blocks if hasattr(b, "router")]
    times, taken = [], []
    with torch.no_grad():
        reference_decode(model, prompt, 4)  # warm-up
        for _ in range(repeats):
            picked = []
            hooks = [r.register_forward_hook(lambda m, a, o: picked.append(float(m.last_selected.float().mean())))
                     for r in routers]
            start = time.perf_counter()
            reference_decode(model, prompt, n_new)
            times.append(time.perf_counter() - start)
            for h in hooks:
                h.remove()
            # the first call per router is the prefill; the rest are one-token decode steps
            steps = picked[len(routers):]
            taken.append(statistics.mean(steps) if steps else 1.0)
    return n_new / statistics.median(times), statistics.mean(taken)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense-steps", type=int, default=200)
    ap.add_argument("--capacity", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    kinds = ("bio", "qa", "city", "country", "story")
    texts = world_texts(kinds=kinds)
    tok = make_tokenizer(texts, vocab_size=1024)
    train_data = token_stream(tok, texts)
    val_data = token_stream(tok, world_texts(kinds=kinds, split="val"))
    dense_cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, max_seq_len=args.seq_len)
    mod_cfg = dense_cfg.replace(mod_capacity=args.capacity)
    flops = mod_forward_flops(mod_cfg, context=args.seq_len)
    mod_steps = round(args.dense_steps / flops["ratio"])  # the same FLOP budget
    torch.manual_seed(0)
    dense = Transformer(dense_cfg)
    dense_sps = train(dense, train_data, args.dense_steps, args.batch, args.seq_len)
    dense_loss, dense_se = evaluate(dense, val_data, args.eval_batches, args.batch, args.seq_len)
    torch.manual_seed(0)
    mod = Transformer(mod_cfg)
    mod_sps = train(mod, train_data, mod_steps, args.batch, args.seq_len)
    torch.manual_seed(0)  # the dense model at the MoD model's step count: more FLOPs, a reference
    dense_long = Transformer(dense_cfg)
    train(dense_long, train_data, mod_steps, args.batch, args.seq_len)
    long_loss, long_se = evaluate(dense_long, val_data, args.eval_batches, args.batch, args.seq_len)
    x, y = next(batches(train_data, 1, args.batch, args.seq_len, seed=7))
    # timed back to back on one batch (the training loops above share the CPU with other jobs)
    dense_step, mod_step = step_seconds(dense, x, y), step_seconds(mod, x, y)
    prompt = val_data[: args.seq_len // 2][None]
    dense_tps, _ = decode_tokens_per_s(dense, prompt, args.seq_len // 2)
    mod_tps, mod_taken = decode_tokens_per_s(mod, prompt, args.seq_len // 2)
    scores = {}
    for routing in ("threshold", "topk"):
        for block in mod.blocks:
            if hasattr(block, "router"):
                block.router.routing = routing
        scores[routing] = evaluate(mod, val_data, args.eval_batches, args.batch, args.seq_len)
    n = args.eval_batches
    config = dict(capacity=args.capacity, routed_layers=flops["routed_layers"], d_model=128, n_layers=4,
                  batch=args.batch, seq_len=args.seq_len, dense_steps=args.dense_steps, mod_steps=mod_steps,
                  flops=flops, train_flop_budget=3 * flops["dense_forward_flops_per_token"] * args.dense_steps
                  * args.batch * args.seq_len, n_eval_batches=n, eval_tokens=n * args.batch * args.seq_len,
                  dense_train_seconds_per_step=dense_sps, mod_train_seconds_per_step=mod_sps,
                  data="world pretrain texts (bio, qa, city, country, story), BPE 1024; eval on the val split")
    rows = [
        result("mixture_of_depths", "heldout_ce_causal_routing", False, scores["threshold"][0], "dense_equal_flops",
               dense_loss, goal=1.0, ours_stderr=scores["threshold"][1], baseline_stderr=dense_se, n=n, **config),
        result("mixture_of_depths", "heldout_ce_topk_routing", False, scores["topk"][0], "dense_equal_flops",
               dense_loss, goal=1.0, ours_stderr=scores["topk"][1], baseline_stderr=dense_se, n=n, **config),
        result("mixture_of_depths", "heldout_ce_causal_routing_vs_dense_equal_steps", False, scores["threshold"][0],
               "dense_equal_steps", long_loss, goal=None, ours_stderr=scores["threshold"][1], baseline_stderr=long_se,
               n=n, steps=mod_steps, note="the dense model here spends 1/ratio more FLOPs; a reference, not the goal"),
        result("mixture_of_depths", "forward_flops_per_token", False, flops["mod_forward_flops_per_token"],
               "dense", flops["dense_forward_flops_per_token"], goal=None, method=flops["method"]),
        result("mixture_of_depths", "seconds_per_forward_backward", False, mod_step, "dense", dense_step, goal=None,
               batch=args.batch, seq_len=args.seq_len, timing="median of 7 after 2 warmup, one fixed batch, "
               "2 CPU threads on a shared machine"),
        result("mixture_of_depths", "decode_tokens_per_s", True, mod_tps, "dense", dense_tps, goal=None,
               prompt_tokens=args.seq_len // 2, new_tokens=args.seq_len // 2, batch=1,
               routed_fraction_of_decoded_tokens=mod_taken, path="reference_decode with the contiguous KV cache, "
               "greedy; MoD routes by its causal predictor; median of 3 after a warm-up, back to back"),
    ]
    write_result("mixture_of_depths", rows)


if __name__ == "__main__":
    main()
