"""The engine on a GPU against transformers on the same card in the same run (issue 18 §2 goals).

Two llama shapes with random weights (speed does not depend on the values: every request decodes a fixed
number of tokens, ignore_eos / min_new_tokens), bf16, the same shapes in both libraries:
- 125m: d_model 768, 12 layers, 12 heads, 4 KV heads, vocab 32000;
- 1b:   d_model 2048, 16 layers, 32 heads, 8 KV heads, d_ff 8192, vocab 32000 (~1.1B parameters).
(a) batch-1 decode tokens/s: our engine (CUDA graphs, device sampling) vs HF `generate` with its static
    cache + torch.compile (goal 1.5x) and vs plain `generate` (goal 2x); both ratios are reported.
(b) 64 requests arriving as a Poisson process (--rate per second), random prompt lengths, each decoding
    --new-tokens: output tokens/s of our engine (continuous batching) vs HF one request at a time (goal
    10x) and vs HF padded batched `generate` of the whole set once it has arrived (goal 2x); TTFT p50/p99
    (from each request's arrival) for all three.
Without CUDA it prints why and exits 0, writing nothing (as cuda_check.py does).

Command (from the repo root, on a lent GPU; about 5 minutes on an H100):
    PYTHONPATH=src python benchmarks/engine_gpu.py --sizes 125m,1b --out /tmp/out
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

import lmstack  # noqa: E402
from lmstack.infer.engine import LLMEngine  # noqa: E402
from lmstack.model import Transformer, preset  # noqa: E402

SHAPES = {
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192),
}
DEV = "cuda"


def sync():
    torch.cuda.synchronize()


def build(size: str, max_len: int):
    cfg = preset("llama-small", vocab_size=32000, max_seq_len=max_len, tie_embeddings=False, **SHAPES[size])
    torch.manual_seed(0)
    ours = Transformer(cfg).to(DEV, torch.bfloat16).eval()
    hf = None
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                          intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                                          num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                          max_position_embeddings=max_len, tie_word_embeddings=False,
                                          attn_implementation="sdpa")).to(DEV, torch.bfloat16).eval()
    except ImportError as e:
        print(f"transformers missing ({e}): HF baselines skipped")
    return cfg, ours, hf


def ours_decode_b1(engine: LLMEngine, prompt: list[int], n: int, repeats: int) -> float:
    params = lmstack.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(repeats + 1):  # the first run captures the graphs
        sync()
        t = time.perf_counter()
        engine.add_request(f"b1-{r}-{time.perf_counter()}", prompt, params)
        engine.run_to_completion()
        sync()
        if r:
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def hf_decode_b1(hf, prompt: list[int], n: int, repeats: int, warmup: int) -> float:
    ids = torch.tensor([prompt], device=DEV)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    times = []
    for r in range(repeats + warmup):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, **kw)
        sync()
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ours_serving(engine: LLMEngine, prompts, offsets, n: int) -> dict:
    params = lmstack.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    pending = list(range(len(prompts)))
    ttft, tokens = [], 0
    sync()
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and offsets[pending[0]] <= now:
            i = pending.pop(0)
            engine.add_request(f"s{i}-{t0}", prompts[i], params, arrival_time=t0 + offsets[i])
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, offsets[pending[0]] - now))
            continue
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                ttft.append(out.metrics.first_token_time - out.metrics.arrival_time)
    sync()
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "wall_s": wall, "tokens": tokens}


class _FirstToken:
    """A transformers streamer that records when the first generated token arrives (its 2nd put)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            sync()
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_sequential(hf, prompts, offsets, n: int) -> dict:
    ttft, tokens = [], 0
    t0 = time.perf_counter()
    for p, off in zip(prompts, offsets):
        wait = t0 + off - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        ids = torch.tensor([p], device=DEV)
        streamer = _FirstToken()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, streamer=streamer)
        tokens += out.shape[1] - ids.shape[1]
        ttft.append(streamer.first - (t0 + off))
    sync()
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "wall_s": wall, "tokens": tokens}


def hf_padded_batch(hf, prompts, offsets, n: int) -> dict:
    """Static batching: wait for the whole set, left-pad it, one generate call."""
    t0 = time.perf_counter()
    wait = t0 + offsets[-1] - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEV)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEV)
    streamer = _FirstToken()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          streamer=streamer, pad_token_id=0)
    sync()
    wall = time.perf_counter() - t0
    tokens = (out.shape[1] - width) * len(prompts)
    ttft = [streamer.first - (t0 + off) for off in offsets]
    return {"tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "wall_s": wall, "tokens": tokens}


def run_size(size: str, args, device_name: str) -> list[dict]:
    max_len = args.max_prompt + args.new_tokens + 16
    cfg, model, hf = build(size, max_len)
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6)
    common = dict(gpu_memory_utilization=args.gpu_memory_utilization, size=size, params_M=params_m, dtype="bf16", weights="random (speed only)", device=device_name,
                  torch=torch.__version__, new_tokens=args.new_tokens, attention_backend=args.attention_backend)
    engine = LLMEngine(model, max_num_seqs=args.requests, max_batched_tokens=2048, dtype=torch.bfloat16,
                       device=DEV, max_model_len=max_len, cuda_graphs=not args.no_cuda_graphs,
                       attention_backend=args.attention_backend,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    common.update(cuda_graphs=engine.runner.graphs is not None, num_blocks=engine.num_blocks)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    out = []
    ours_b1 = ours_decode_b1(engine, prompt, args.new_tokens, args.repeats)
    print(f"[{size}] ours batch-1 decode: {ours_b1:.1f} tokens/s", flush=True)
    if hf is not None:
        plain = hf_decode_b1(hf, prompt, args.new_tokens, args.repeats, warmup=1)
        out.append(result("engine_gpu", f"decode_b1_tokens_per_s_vs_hf_generate_{size}", True, round(ours_b1, 1),
                          "transformers generate (dynamic cache)", round(plain, 1), goal=2.0,
                          prompt_len=args.prompt_len, **common))
        if not args.skip_compile:
            try:
                hf.generation_config.cache_implementation = "static"
                hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                comp = hf_decode_b1(hf, prompt, args.new_tokens, args.repeats, warmup=3)
                out.append(result("engine_gpu", f"decode_b1_tokens_per_s_vs_hf_static_compiled_{size}", True,
                                  round(ours_b1, 1), "transformers generate (static cache + torch.compile)",
                                  round(comp, 1), goal=1.5, prompt_len=args.prompt_len, **common))
            except Exception as e:  # a transformers/torch pairing that cannot compile: say so, keep the rest
                print(f"[{size}] HF static+compile failed: {type(e).__name__}: {e}"[:400])
            finally:
                hf.generation_config.cache_implementation = None
                hf.forward = type(hf).forward.__get__(hf)
    # (b) serving under Poisson arrivals
    prompts = [torch.randint(3, cfg.vocab_size, (random.Random(i).randint(args.min_prompt, args.max_prompt),),
                             generator=g).tolist() for i in range(args.requests)]
    offsets = arrivals(args.requests, args.rate, seed=0)
    ours_serving(engine, prompts[:8], [0.0] * 8, 8)  # warm-up: captures the common buckets
    ours = ours_serving(engine, prompts, offsets, args.new_tokens)
    print(f"[{size}] ours serving: {ours}", flush=True)
    conf = dict(requests=args.requests, rate_per_s=args.rate, prompt_len=[args.min_prompt, args.max_prompt],
                ttft_p50_s_ours=round(ours["ttft_p50_s"], 4), ttft_p99_s_ours=round(ours["ttft_p99_s"], 4), **common)
    if hf is not None:
        seq = hf_sequential(hf, prompts, offsets, args.new_tokens)
        print(f"[{size}] HF sequential: {seq}", flush=True)
        out.append(result("engine_gpu", f"serving_output_tokens_per_s_vs_hf_sequential_{size}", True,
                          round(ours["tokens_per_s"], 1), "transformers generate, one request at a time",
                          round(seq["tokens_per_s"], 1), goal=10.0, ttft_p50_s_baseline=round(seq["ttft_p50_s"], 4),
                          ttft_p99_s_baseline=round(seq["ttft_p99_s"], 4), **conf))
        batch = hf_padded_batch(hf, prompts, offsets, args.new_tokens)
        print(f"[{size}] HF padded batch: {batch}", flush=True)
        out.append(result("engine_gpu", f"serving_output_tokens_per_s_vs_hf_padded_batch_{size}", True,
                          round(ours["tokens_per_s"], 1), "transformers generate, the whole set padded into one batch",
                          round(batch["tokens_per_s"], 1), goal=2.0, ttft_p50_s_baseline=round(batch["ttft_p50_s"], 4),
                          ttft_p99_s_baseline=round(batch["ttft_p99_s"], 4), **conf))
    del engine, model, hf
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="125m,1b", help="comma-separated: 125m, 1b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128, help="batch-1 prompt length")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=16.0, help="Poisson arrival rate, requests per second")
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention-backend", default="sdpa", choices=["sdpa", "flex"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="the engine's KV pool budget; the rest stays free for transformers in the same process")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="ablation: the engine without decode graphs")
    ap.add_argument("--skip-compile", action="store_true", help="skip HF static cache + torch.compile")
    ap.add_argument("--out", default="", help="also copy the JSON into this directory")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("engine_gpu: no CUDA device here; nothing measured, nothing written")
        return
    name = torch.cuda.get_device_name()
    results = []
    for size in args.sizes.split(","):
        results.extend(run_size(size.strip(), args, name))
    path = write_result("engine_gpu", results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / path.name).write_text(path.read_text())


if __name__ == "__main__":
    main()
