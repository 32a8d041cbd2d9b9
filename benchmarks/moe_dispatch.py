"""MoE dispatch: grouped (sorted by expert, one matmul per expert) vs the per-token loop, vs the previous
per-expert masked gather, and vs a dense model with the same active parameters.

Model: 4 layers x 256 wide, 8 experts of width 512, top-2 (Mixtral-style SwiGLU experts). The dense
model has the same attention and one SwiGLU MLP of width 2 x 512 = 1,024, so every token runs the
same number of expert-MLP parameters (arithmetic: 3 * 256 * 1024 per layer both ways); it lacks the
router and the 6 idle experts.

Two workloads, each the median of interleaved repeats:
- prefill: one forward (no grad) over 2 x 256 tokens, tokens/s.
- decode: the inference engine (lmstack.LLM) generating 32 tokens greedily for 8 prompts at once,
  so each step dispatches 8 tokens; tokens/s. Outputs of grouped and loop are checked identical.
Dispatch variants: grouped (moe.py's default), loop (moe.py's reference: one (1, D) matmul per token
and chosen expert), masked (the dispatch this file replaced: for each expert, torch.where over the
(N, k) routing table, gather, matmul, index_add).

Usage:
    python benchmarks/moe_dispatch.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import result, write_result

from lmstack.infer import LLM, SamplingParams
from lmstack.model import ModelConfig, Transformer
from lmstack.model.moe import MoE

MACHINE = "2 cores, shared"


def masked_dispatch(moe: MoE):
    """The previous dispatch: per expert, find its slots with torch.where over the routing table."""
    def run(x, weights, experts, counts):
        out = torch.zeros_like(x)
        for e in counts.nonzero().flatten().tolist():
            token, slot = torch.where(experts == e)
            out.index_add_(0, token, moe.expert(e, x[token]) * weights[token, slot, None].to(x.dtype))
        return out, 0
    return run


def set_dispatch(model: Transformer, how: str) -> None:
    for b in model.blocks:
        if isinstance(b.mlp, MoE):
            b.mlp.__dict__.pop("_grouped", None)
            b.mlp.dispatch = "loop" if how == "loop" else "grouped"
            if how == "masked":
                b.mlp._grouped = masked_dispatch(b.mlp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512)
    torch.manual_seed(0)
    moe = Transformer(ModelConfig(n_experts=8, moe_top_k=2, moe_d_ff=512, **base)).eval()
    dense = Transformer(ModelConfig(d_ff=1024, **base)).eval()
    ids = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(0))
    prompts = torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engines = {"moe": LLM(moe, max_num_seqs=8, enable_prefix_caching=False),
               "dense": LLM(dense, max_num_seqs=8, enable_prefix_caching=False)}
    variants = [("moe", "grouped"), ("moe", "loop"), ("moe", "masked"), ("dense", None)]

    def prefill(which, how):
        model = moe if which == "moe" else dense
        if how:
            set_dispatch(model, how)
        with torch.no_grad():
            model(ids)

    def decode(which, how):
        if how:
            set_dispatch(moe, how)
        return [o.outputs[0].token_ids for o in engines[which].generate(prompts, params)]

    for v in variants:  # warm up
        prefill(*v)
        decode(*v)
    times = {("prefill",) + v: [] for v in variants} | {("decode",) + v: [] for v in variants}
    outs = {}
    for _ in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            prefill(*v)
            times[("prefill",) + v].append(time.perf_counter() - start)
            start = time.perf_counter()
            outs[v] = decode(*v)
            times[("decode",) + v].append(time.perf_counter() - start)
    if outs[("moe", "grouped")] != outs[("moe", "loop")] or outs[("moe", "grouped")] != outs[("moe", "masked")]:
        raise SystemExit("grouped dispatch decoded different tokens from the loop / masked dispatch")
    n_tok = {"prefill": ids.numel(), "decode": sum(len(o) for o in outs[("moe", "grouped")])}
    tps = {k: n_tok[k[0]] / statistics.median(t) for k, t in times.items()}
    for k, t in tps.items():
        print(f"{k}: {t:.0f} tokens/s", flush=True)
    cfg = dict(model="4 layers x 256, 8 experts x 512 (SwiGLU), top-2; vocab 4096", dense="same, one SwiGLU MLP of 1024",
               prefill_tokens=n_tok["prefill"], decode="8 prompts x 32 new tokens, batch 8, greedy",
               active_mlp_params_per_layer_arithmetic=3 * 256 * 1024, repeats=args.repeats, timing="median",
               threads=args.threads, machine=MACHINE, identical_decode_tokens=True)
    rows = []
    for phase in ("prefill", "decode"):
        g = tps[(phase, "moe", "grouped")]
        for name, key in (("per-token loop", ("moe", "loop")), ("per-expert masked gather (previous)", ("moe", "masked")),
                          ("dense model, same active parameters", ("dense", None))):
            tag = {"moe": key[1], "dense": "dense"}[key[0]]
            rows.append(result("moe_dispatch", f"{phase}_tokens_per_s_vs_{tag}", True, round(g, 1), name,
                               round(tps[(phase,) + key], 1), **cfg))
    write_result("moe_dispatch", rows)


if __name__ == "__main__":
    main()
