"""What the engine's static decode path, torch.compile of it, and the flex_attention backend buy on this CPU.

The engine decodes through the model's own forward (default). cuda_graphs=True on a CPU runs the decode
graphs' static path uncaptured (padded batch buckets, block tables padded to a context bucket); compile_decode
runs that static step through torch.compile (one specialisation per bucket). attention_backend='flex' runs
the paged decode attention through eager flex_attention (compiled only on CUDA). Each variant decodes the same
greedy requests, variants interleaved per repeat (shared machine), median tokens/s; compile time is excluded
(warm-up) and reported in the config. Random weights: speed only.

    PYTHONPATH=src python benchmarks/decode_compile_cpu.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import result, write_result  # noqa: E402

from lmstack.infer.engine import LLMEngine  # noqa: E402
from lmstack.infer.sampling_params import SamplingParams  # noqa: E402
from lmstack.model import Transformer, preset  # noqa: E402

VARIANTS = {
    "engine": dict(),
    "static": dict(cuda_graphs=True),
    "static_compiled": dict(compile_decode=True),
    "flex": dict(attention_backend="flex"),
}


def make_engine(model, batch, max_len, kw):
    return LLMEngine(model, max_num_seqs=batch, block_size=16, num_blocks=batch * (max_len // 16 + 1) + 4,
                     max_model_len=max_len, **kw)


def decode(engine, prompts, new_tokens) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.perf_counter()}-{i}", p, params)
    t = time.perf_counter()
    outs = engine.run_to_completion()
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager flex warns that it is unfused
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=2048, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                 d_ff=4 * args.d_model, max_seq_len=256)
    model = Transformer(cfg).eval()
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    max_len = args.prompt_len + args.new_tokens + 16
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(batch)]
        engines, warm, tokens = {}, {}, {}
        for name, kw in VARIANTS.items():
            engines[name] = make_engine(model, batch, max_len, kw)
            t = time.perf_counter()
            _, outs = decode(engines[name], prompts, args.new_tokens)  # warm-up: compiles every bucket it meets
            warm[name] = round(time.perf_counter() - t, 2)
            tokens[name] = sorted(o.outputs[0].token_ids for o in outs)
        same = {name: tokens[name] == tokens["engine"] for name in VARIANTS}
        speed = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name in VARIANTS:  # interleaved: load on the shared machine hits every variant alike
                speed[name].append(decode(engines[name], prompts, args.new_tokens)[0])
        med = {name: statistics.median(v) for name, v in speed.items()}
        conf = dict(batch=batch, params_M=params_m, d_model=args.d_model, layers=args.layers,
                    new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
                    threads=torch.get_num_threads(), machine="2 cores, shared", torch=torch.__version__,
                    warmup_s=warm, same_greedy_tokens=same,
                    tokens_per_s_median={k: round(v, 1) for k, v in med.items()},
                    weights="random (speed only)")
        for name, label in (("static", "static decode path, uncaptured"), ("static_compiled",
                            "static decode path + torch.compile"), ("flex", "flex_attention backend (eager)")):
            results.append(result("decode_compile_cpu", f"tokens_per_s_{name}_vs_engine_b{batch}", True,
                                  round(med[name], 1), "engine default (model's own forward, SDPA)",
                                  round(med["engine"], 1), variant=label, **conf))
    write_result("decode_compile_cpu", results)


if __name__ == "__main__":
    main()
