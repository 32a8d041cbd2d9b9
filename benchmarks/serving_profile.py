"""Where the serving benchmark's time goes: its workload replayed in one in-process LLMEngine, split by part.

benchmarks/serving.py measures throughput through the real HTTP server. This replays the same kind of workload
(64 requests, random prompts of 16..362 tokens log-uniform, 16..128 output tokens, EOS ignored; llama-base,
random weights, fp32, fused projections as LLM(dir) loads it; max_num_seqs 32, max_batched_tokens 512) with
every request queued at the start, and times the parts of each step with decode_concurrency.py's timers:
schedule, layout, matmuls (every Linear and the LM head), attention (the paged cache's attend), the rest of
the forward (embedding, norms, RoPE, residuals, Python per layer), sampling + postprocess, and the engine's own
rest. Steps are also split by kind: pure decode steps, and steps that carry prompt chunks. The FLOP rate is
counted as in serving.py (prompt tokens through the body, output tokens through body + head) against a
decode-sized GEMM on the same threads.

    PYTHONPATH=src python benchmarks/serving_profile.py [--requests 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict

import torch

from _common import result, write_result
from decode_concurrency import Timers
from serving import gemm_gflops  # the same GEMM rate serving.py reports against

from lmstack.infer import LLMEngine, SamplingParams
from lmstack.model import Transformer, preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max_num_seqs", type=int, default=32)
    ap.add_argument("--max_batched_tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("llama-base")
    model = Transformer(cfg).eval().fuse_projections()
    engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                       enable_prefix_caching=False, seed=0)
    rng = random.Random(0)
    reqs = []
    for _ in range(args.requests):
        n = int(math.exp(rng.uniform(math.log(16), math.log(362))))
        reqs.append(([rng.randrange(10, cfg.vocab_size) for _ in range(n)], rng.randint(16, 128)))
    engine.add_request("warm", reqs[0][0][:32], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.run_to_completion()
    for i, (prompt, out) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True))
    seen = {}
    real_build = engine.runner.build

    def build(plan):  # records what kind of step this is (Timers wraps this too)
        ids, meta = real_build(plan)
        seen["prompt"], seen["rows"] = bool(meta.prefills), ids.shape[1]
        return ids, meta

    engine.runner.build = build
    timers = Timers(engine)
    kinds = defaultdict(lambda: [0, 0.0, 0])  # kind -> [steps, seconds, rows]
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            seen.clear()
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            kind = "with_prompt_chunks" if seen.get("prompt") else "decode_only"
            kinds[kind][0] += 1
            kinds[kind][1] += dt
            kinds[kind][2] += seen.get("rows", 0)
    finally:
        timers.undo()
        engine.runner.build = real_build
    wall = time.perf_counter() - start
    t = timers.total
    parts = {"schedule": t["schedule"], "layout": t["layout"], "matmuls": t["matmuls"], "attention": t["attention"],
             "other_forward": t["forward"] - t["layout"] - t["matmuls"] - t["attention"],
             "sample_post": t["sample+post"]}
    parts["rest"] = wall - sum(parts.values())
    prompt_tokens = sum(len(p) for p, _ in reqs)
    output_tokens = sum(o for _, o in reqs)
    body = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    head = model.lm_head.weight.numel() if model.lm_head is not None else model.tok_emb.weight.numel()
    flops = 2 * (prompt_tokens * body + output_tokens * (body + head))
    gemm = gemm_gflops(args.threads)
    seconds = {k: round(v, 3) for k, v in parts.items()}
    print(f"{output_tokens} output tokens in {wall:.1f}s ({output_tokens / wall:.1f} tok/s); parts (s): {seconds}; "
          f"steps: {dict(kinds)}; {flops / wall / 1e9:.1f} GFLOP/s of {gemm:.1f}", flush=True)
    write_result("serving_profile", [
        result("serving_profile", "output_tokens_per_s_in_process", True, round(output_tokens / wall, 2),
               "a decode-sized GEMM's FLOP rate, as tokens/s at this workload's FLOPs per output token",
               round(gemm * 1e9 / (flops / output_tokens), 2), requests=args.requests, threads=args.threads,
               preset="llama-base", dtype="float32", prompt_tokens=prompt_tokens, output_tokens=output_tokens,
               max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
               seconds=round(wall, 2), seconds_by_part=seconds,
               share_by_part={k: round(v / wall, 3) for k, v in parts.items()},
               steps_by_kind={k: {"steps": v[0], "seconds": round(v[1], 2), "mean_rows": round(v[2] / max(v[0], 1), 1)}
                              for k, v in kinds.items()},
               gflops=round(flops / wall / 1e9, 2), gemm_gflops_same_threads=round(gemm, 2),
               fraction_of_gemm_rate=round(flops / wall / 1e9 / gemm, 3),
               arrivals="all queued at the start (the HTTP benchmark's Poisson arrivals are in serving.py)"),
    ])


if __name__ == "__main__":
    main()
