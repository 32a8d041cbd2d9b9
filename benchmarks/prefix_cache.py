"""Prefix caching: time to first token with and without a shared 512-token system prompt in the cache.

The llama-base preset (~123M, random init). Requests = the same 512-token system prompt + a different
32-token user tail, sent one after another (batch 1, so TTFT is pure prefill). With prefix caching the
first request fills the cache and the others reuse its 32 full blocks, prefilling only their tail
(plus the partial block); without it every request prefills all 544 tokens. We report the median TTFT
of the requests after the first, and the prefill tokens each engine computed (from engine.stats()).

Usage:
    python benchmarks/prefix_cache.py [--requests 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from _common import result, write_result

import lmstack
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.model import Transformer, preset


def ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> float:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--system_tokens", type=int, default=512)
    ap.add_argument("--tail_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("llama-base")
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(Transformer(cfg), d)
        model = lmstack.load_model(d)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, cfg.vocab_size, (args.system_tokens,), generator=g).tolist()
    prompts = [system + torch.randint(0, cfg.vocab_size, (args.tail_tokens,), generator=g).tolist()
               for _ in range(args.requests)]
    engines = {"cached": LLMEngine(model, max_num_seqs=1, num_blocks=256),
               "plain": LLMEngine(model, max_num_seqs=1, num_blocks=256, enable_prefix_caching=False)}
    times = {k: [] for k in engines}
    for i, p in enumerate(prompts):  # alternate so both engines see the same machine noise
        for name, eng in engines.items():
            times[name].append(ttft(eng, f"{name}{i}", p))
    later = {k: statistics.median(v[1:]) for k, v in times.items()}
    stats = {k: e.stats() for k, e in engines.items()}
    print(f"TTFT with a cached {args.system_tokens}-token system prompt: {later['cached'] * 1000:.0f} ms, "
          f"without: {later['plain'] * 1000:.0f} ms; first (cold) request {times['cached'][0] * 1000:.0f} ms; "
          f"prefill tokens {stats['cached']['prefill_tokens']} vs {stats['plain']['prefill_tokens']}", flush=True)
    write_result("prefix_cache", [result(
        "prefix_cache", "ttft_s", False, later["cached"], "no prefix caching", later["plain"], goal=None,
        preset="llama-base", system_tokens=args.system_tokens, tail_tokens=args.tail_tokens,
        requests=args.requests, block_size=16, cold_first_request_s=round(times["cached"][0], 4),
        prefill_tokens_cached=stats["cached"]["prefill_tokens"], prefill_tokens_plain=stats["plain"]["prefill_tokens"],
        prefix_cache_hit_tokens=stats["cached"]["prefix_cache_hit_tokens"], threads=args.threads,
        all_ttft_s={k: [round(t, 4) for t in v] for k, v in times.items()})])


if __name__ == "__main__":
    main()
