"""What the C++ decode ops (lmstack.kernels.decode_ops) buy: per op, and per engine decode step.

Part 1, per op, on llama-base's decode shapes (d_model 768, 12 query / 3 KV heads of 64), microseconds
per call (median of interleaved repeats), against the torch expression the model runs without them (the baseline
a user gets: torch.rms_norm, rotate-half RoPE as torch ops, and the engine's own SDPA path for
the paged keys):
- rms_norm (1 row), rope (q and k heads of 1 token),
- paged attention of 1 and of 8 sequences over 256 keys each (the baseline: the engine's PagedKVCache.attend with
  the kernels off: K/V in place for one sequence, a gather and one masked SDPA for 8).
Part 2, per engine step: llama-base (random weights, fp32, fused projections as LLM(dir) loads it) decoding in
one LLMEngine with the skinny GEMM on in both arms; the decode ops are switched on and off for alternate steps
of the same requests, so both arms see the same contexts and the same machine state. Median ms per decode step
at batch 1 and batch 8.

    PYTHONPATH=src python benchmarks/decode_ops.py [--repeats 200] [--steps 200] [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from _common import result, write_result

import lmstack.infer.paged_attention as paged_mod
import lmstack.model.attention as attention_mod
import lmstack.model.mlp as mlp_mod
import lmstack.model.norms as norms_mod
from lmstack.infer import LLMEngine, SamplingParams
from lmstack.infer.model_runner import ModelRunner
from lmstack.infer.sequence import Request
from lmstack.infer.step_plan import StepPlan
from lmstack.kernels import build, decode_ops
from lmstack.model import Transformer, preset
from lmstack.model.linear import decode_kernels, kernels_on
from lmstack.model.positions import apply_rotary

SWITCHED = (norms_mod, mlp_mod, attention_mod, paged_mod)  # the modules that read kernels_on() for decode ops


def switch(on: bool) -> None:
    """Decode ops on or off; the skinny GEMM (model/linear.py) stays as the scope says."""
    for mod in SWITCHED:
        mod.kernels_on = kernels_on if on else (lambda: False)


def per_call_us(fns: dict, repeats: int) -> dict:
    """Median microseconds per call of each fn, interleaved so load hits them alike."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def part1(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    d, h, hkv, hd, keys = 768, 12, 3, 64, 256
    x, w = torch.randn(1, 1, d), torch.randn(d)
    qkv = torch.randn(1, 1, h + 2 * hkv, hd)
    qk = qkv[:, :, :h + hkv]
    cos, sin = torch.randn(1, 1, hd), torch.randn(1, 1, hd)
    cfg = preset("llama-base")
    rows = []
    ops = {
        "rms_norm": (lambda: decode_ops.rms_norm(x, w, 1e-5), lambda: torch.rms_norm(x, w.shape, w, 1e-5)),
        "rope": (lambda: decode_ops.rope(qk, cos, sin), lambda: apply_rotary(qk, cos, sin)),
    }
    for batch in (1, 8):
        ops[f"attention_b{batch}"] = attention_pair(cfg, batch, keys)
    with torch.inference_mode():
        for name, (ours, torch_fn) in ops.items():
            us = per_call_us({"ours": ours, "torch": torch_fn}, repeats)
            rows.append(result("decode_ops", f"us_per_call_{name}", False, round(us["ours"], 2),
                               "the torch ops the model runs without the kernel", round(us["torch"], 2),
                               op=name, repeats=repeats, keys=keys if name.startswith("attention") else None))
    return rows


def attention_pair(cfg, batch: int, keys: int):
    """(ours, baseline) for PagedKVCache.attend on a pure decode step of `batch` sequences with `keys` keys each."""
    small = Transformer(dataclasses.replace(cfg, n_layers=1)).eval()
    block = 16
    runner = ModelRunner(small, num_blocks=batch * (keys // block + 1) + 1, block_size=block)
    runner.cache.k.normal_()
    runner.cache.v.normal_()
    plan = []
    for b in range(batch):
        seq = Request(f"r{b}", None, list(range(keys)), SamplingParams()).seqs[0]
        first = b * (keys // block + 1)
        seq.block_table = list(range(first, first + keys // block + 1))
        plan.append((seq, [1], keys - 1))
    _, meta = runner.build(StepPlan.of(plan, list(range(batch))))
    cache, attn = runner.cache, small.blocks[0].attn
    cache.meta = meta
    q = torch.randn(1, cfg.n_heads, batch, cfg.head_dim)
    k = torch.randn(1, cfg.n_kv_heads, batch, cfg.head_dim)
    v = torch.randn_like(k)

    def ours():
        with decode_kernels(True):
            return cache.attend(0, q, k, v, attn, None)

    def baseline():
        with decode_kernels(False):
            return cache.attend(0, q, k, v, attn, None)

    with torch.inference_mode():
        assert torch.allclose(ours(), baseline(), atol=1e-5)
    return ours, baseline


def part2(steps: int, batches: list[int]) -> list[dict]:
    cfg = preset("llama-base")
    torch.manual_seed(0)
    model = Transformer(cfg).eval().fuse_projections()  # LLM(dir) fuses the projections of the model it loads
    rows = []
    for batch in batches:
        engine = LLMEngine(model, max_num_seqs=batch, enable_prefix_caching=False, seed=0,
                           max_model_len=64 + steps + 8)
        params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
        for b in range(batch):
            engine.add_request(f"b{batch}-{b}", torch.randint(0, cfg.vocab_size, (32,)).tolist(), params)
        engine.step()  # the prefill
        times = {True: [], False: []}
        for i in range(steps):
            on = i % 2 == 0
            switch(on)
            start = time.perf_counter()
            engine.step()
            times[on].append(time.perf_counter() - start)
        switch(True)
        ms = {on: statistics.median(v) * 1e3 for on, v in times.items()}
        rows.append(result("decode_ops", f"ms_per_decode_step_b{batch}", False, round(ms[True], 3),
                           "the same engine step with torch's ops for norms, RoPE and attention",
                           round(ms[False], 3), batch=batch, steps_per_arm=steps // 2, preset="llama-base",
                           dtype="float32", skinny_gemm="on in both arms", contexts="33 to 33 + steps keys"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if build.extension() is None:
        raise SystemExit(f"the kernels are not available here: {build.info()}")
    rows = part1(args.repeats) + part2(args.steps, [1, 8])
    common = {"threads": args.threads, "torch": torch.__version__, "isa": build.info()["isa"],
              "machine": "2 cores" if (os.cpu_count() or 0) <= 2 else f"{os.cpu_count()} cores"}
    for r in rows:
        r["config"].update(common)
        print(f"{r['metric']}: ours {r['ours']} vs {r['baseline']['value']} ({r['ratio']}x)", flush=True)
    write_result("decode_ops", rows)


if __name__ == "__main__":
    main()
