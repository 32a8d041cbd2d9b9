"""Batch-1 engine decode through the model's own forward vs the old decode-only copy (FastDecoder), same run.

Issue 18 deleted infer/fast_decode.py, a second copy of the block math that the engine used for batch-1
decode steps; the engine now runs the model's own forward for every step (with fused q/k/v and gate/up
projections). This measures what that costs or gains: the llama-base preset (~123M, random init) saved
once in HF layout and loaded twice by LLM(dir) in one process:
- ours: the engine as it is;
- baseline: the same engine whose runner sends single-sequence short steps (the decode tokens) through
  FastDecoder, as it did before: its source is read from git at --baseline_ref (the last commit that has
  infer/fast_decode.py) and run on the split-projection model with the branch condition it had then.
So both sides run the same engine loop and sampler, and only the decode path differs. Generations
alternate between the two so they share the machine's noise; the best of REPEATS counts (the medians are
in the config too).
Decode time per token = (time of a NEW_TOKENS generation - time of a 1-token generation) / (NEW_TOKENS - 1),
so the prefill is not counted. Greedy tokens must be identical.

Usage:
    python benchmarks/decode_one_path.py [--new_tokens 64] [--repeats 5] [--threads 1 2] [--baseline_ref 6a73c31]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
import subprocess
import tempfile
import time
import types

import torch

from _common import result, write_result

import lmstack
from lmstack.infer import LLM, SamplingParams
from lmstack.model import Transformer, preset

ROOT = Path(__file__).resolve().parents[1]
SHORT_QUERY = 16  # the old branch: chunks of at most this many tokens that extend a context


def load_fast_decoder(ref: str) -> types.ModuleType:
    """infer/fast_decode.py as it was at `ref`, as a module (it needs only lmstack.model)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/lmstack/infer/fast_decode.py"],
                         capture_output=True, text=True)
    if src.returncode:
        raise SystemExit(f"{ref} has no src/lmstack/infer/fast_decode.py; pass a commit that has it")
    module = types.ModuleType("fast_decode_baseline")
    exec(compile(src.stdout, f"{ref}:fast_decode.py", "exec"), module.__dict__)
    return module


def with_fast_decoder(llm: LLM, fast_decode: types.ModuleType) -> None:
    """Give llm's runner the old FastDecoder branch (single sequence, short chunk, contiguous blocks)."""
    runner = llm.engine.runner
    model = runner.model.unfuse_projections()  # FastDecoder reads q_proj/k_proj/... and fuses its own copy
    fast = fast_decode.FastDecoder.build(model, runner.cache, share_weights=True)
    if fast is None:
        raise SystemExit("FastDecoder does not support this config")
    generic = runner._run
    bs = runner.block_size

    def contiguous(seq, length: int) -> bool:
        table = seq.block_table[: -(-length // bs)]
        return all(b - a == 1 for a, b in zip(table, table[1:]))

    def run(plan):
        rows = plan.logit_rows
        if len(plan.seqs) == 1:
            p = plan.seqs[0]
            t = len(p.tokens)
            tail = rows == list(range(t - len(rows), t))
            if (t == 1 or (p.start > 0 and t <= SHORT_QUERY)) and rows and tail and contiguous(p.seq, p.start + t):
                with torch.inference_mode():
                    return fast.step(p.tokens, p.start, p.seq.block_table[0] * bs, len(rows)).float().cpu()
        return generic(plan)

    runner._run = run


def decode_seconds(llm: LLM, prompt: list[int], n: int) -> tuple[float, list[int]]:
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], one)
    t1 = time.perf_counter()
    out = llm.generate([prompt], many)[0].outputs[0].token_ids
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (n - 1), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--baseline_ref", default="6a73c31", help="a commit that still has infer/fast_decode.py")
    args = ap.parse_args()
    fast_decode = load_fast_decoder(args.baseline_ref)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(Transformer(preset("llama-base")), d)
        llms = {"ours": LLM(d, max_num_seqs=1, enable_prefix_caching=False),
                "fast_decode": LLM(d, max_num_seqs=1, enable_prefix_caching=False)}
    with_fast_decoder(llms["fast_decode"], fast_decode)
    assert llms["ours"].engine.model.config.fused_projections  # what the engine makes of a model it loads
    prompt = list(range(100, 132))
    n = args.new_tokens
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for llm in llms.values():
            decode_seconds(llm, prompt, 8)  # warm up
        secs = {k: [] for k in llms}
        tokens = {}
        for _ in range(args.repeats):
            for name, llm in llms.items():
                s, tokens[name] = decode_seconds(llm, prompt, n)
                secs[name].append(s)
        tok_s = {k: 1 / min(v) for k, v in secs.items()}
        same = tokens["ours"] == tokens["fast_decode"]
        print(f"threads={threads}: model forward {tok_s['ours']:.1f} tok/s, FastDecoder {tok_s['fast_decode']:.1f} "
              f"tok/s, ratio {tok_s['ours'] / tok_s['fast_decode']:.3f}, identical greedy tokens: {same}", flush=True)
        results.append(result(
            "decode_one_path", f"decode_tokens_per_s_threads{threads}", True, tok_s["ours"],
            f"FastDecoder (infer/fast_decode.py at {args.baseline_ref}) in the same engine", tok_s["fast_decode"],
            goal=1.0, preset="llama-base", prompt_len=len(prompt), new_tokens=n, threads=threads, dtype="float32",
            batch=1, repeats=args.repeats, identical_greedy_tokens=same, machine="2 cores, shared",
            median_tok_s={k: round(1 / statistics.median(v), 2) for k, v in secs.items()},
            all_tok_s={k: [round(1 / x, 2) for x in v] for k, v in secs.items()}))
    write_result("decode_one_path", results)


if __name__ == "__main__":
    main()
