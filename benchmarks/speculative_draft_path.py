"""The draft-model proposer's greedy fast path, before/after: the same engine, pair and prompts, with the
speculative decoder's greedy shortcuts on (guesses by plain argmax, no sampler rows, no q; verification by
raw argmax) and off (every guess and every verify row through the sampler's processing, as before).

The pair is benchmarks/speculative.py's cached speedrun-shaped target and 2x128 draft (run that first).
Runs alternate (fast path, sampler path, repeat); medians; identical greedy output asserted.

Usage:
    python benchmarks/speculative_draft_path.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import types

import torch

from _common import result, write_result

import speculative as bench
from lmstack.infer import LLM, SamplingParams
from lmstack.infer import logits_processors
from lmstack.infer import speculative as spec_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, target, draft, held_out, info = bench.trained_pair(280, 1)
    ps = bench.prompts_of(tok, held_out["chat_qa"][: args.prompts // 2] + held_out["chat_other"], args.prompts, 48,
                          args.new_tokens)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm = LLM(target, tokenizer=tok, max_num_seqs=1, enable_prefix_caching=False,
              speculative={"method": "draft", "draft_model": draft, "num_tokens": args.k})
    # the sampler path: speculative.py's view of "needs processing" says yes for every row
    always = types.SimpleNamespace(**{n: getattr(logits_processors, n) for n in dir(logits_processors)
                                      if not n.startswith("__")})
    always.needs_processing = lambda p: True
    fast_lp = spec_module.lp
    times = {"fast": [], "sampler": []}
    outs = {}
    bench.generate_all(llm, ps[:1], params)  # warm up
    for _ in range(args.repeats):
        for name, mod in (("fast", fast_lp), ("sampler", always)):
            spec_module.lp = mod
            try:
                t, outs[name] = bench.generate_all(llm, ps, params)
            finally:
                spec_module.lp = fast_lp
            times[name].append(t)
        if outs["fast"] != outs["sampler"]:
            raise SystemExit("the greedy fast path changed the output")
    n_tok = sum(len(o) for o in outs["fast"])
    ours, base = n_tok / statistics.median(times["fast"]), n_tok / statistics.median(times["sampler"])
    write_result("speculative_draft_path", [result(
        "speculative_draft_path", "tokens_per_s_draft_greedy_fast_path", True, round(ours, 2),
        "the same draft proposer through the sampler's processing", round(base, 2), goal=None, text="world_chat",
        k=args.k, prompts=len(ps), new_tokens=args.new_tokens, repeats=args.repeats, timing="median", threads=1,
        identical_greedy_output=True, machine="2 cores, shared")])


if __name__ == "__main__":
    main()
