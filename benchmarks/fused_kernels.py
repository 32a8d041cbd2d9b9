"""Fused kernels on CPU: fused linear + cross-entropy at large vocabularies, fused RMSNorm and SwiGLU.

1. Training step (forward + backward of a 2-layer llama-style model and its LM loss, AdamW-free: the
   optimizer is the same for both and would only add noise) at vocab 32k / 64k / 128k, 2,048 tokens
   per step: ours = objective.fused_ce (model/fused_ce.py), baseline = the unfused head + F.cross_entropy
   on the same weights and batch (the trainer's default path). Peak memory is the rise of the process's
   resident set (VmHWM, reset before each step) over its level before the step; tokens/s is the median
   over interleaved repeats. The losses of both paths are checked equal.
2. RMSNorm and SwiGLU forward + backward on (4096, 512) / (4096, 1408): the unfused modules in eager
   mode (baseline) against fused.py's Function run eager, the same Function with its math compiled by
   torch.compile (inductor, C++), and torch.compile applied to the unfused module. The one-time compile
   cost is reported too. Bytes saved for backward are counted with saved_tensors_hooks.

Usage:
    python benchmarks/fused_kernels.py [--vocabs 32768 65536 131072] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

from lmstack.model import ModelConfig, Transformer
from lmstack.model.fused import rms_norm, swiglu
from lmstack.train.objectives import ObjectiveConfig, build_objective

MACHINE = "2 cores, shared"


def step_fn(model, obj, batch):
    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = obj.loss(model, batch)
        loss.backward()
        return float(loss.detach())
    return run


def measure_step(run) -> tuple[float, float, float]:
    """(seconds, peak MB above the pre-step RSS, loss) of one training step."""
    gc.collect()
    base = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    loss = run()
    secs = time.perf_counter() - start
    return secs, peak_rss_mb() - base, loss


def head_rows(vocabs: list[int], tokens: int, repeats: int) -> list[dict]:
    rows = []
    seq = 256
    batch = tokens // seq
    for v in vocabs:
        cfg = ModelConfig(vocab_size=v, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=seq,
                          tie_embeddings=True)
        torch.manual_seed(0)
        model = Transformer(cfg)
        tok = torch.randint(0, v, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
        runs = {}
        for fused in (False, True):
            obj = build_objective(ObjectiveConfig(name="clm", fused_ce=fused), cfg)
            runs[fused] = step_fn(model, obj, obj.prepare(tok, torch.Generator().manual_seed(0)))
        for r in runs.values():
            r()  # warm up
        stats = {False: [], True: []}
        for _ in range(repeats):  # interleaved so machine noise hits both alike
            for fused, r in runs.items():
                stats[fused].append(measure_step(r))
        loss = {f: s[-1][2] for f, s in stats.items()}
        if abs(loss[True] - loss[False]) > 1e-4 * max(1.0, abs(loss[False])):
            raise SystemExit(f"vocab {v}: fused loss {loss[True]} != unfused {loss[False]}")
        med = {f: (statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)) for f, s in stats.items()}
        common = dict(vocab=v, tokens_per_step=tokens, d_model=256, n_layers=2, repeats=repeats, timing="median",
                      loss=round(loss[False], 4), threads=torch.get_num_threads(), machine=MACHINE,
                      logits_fp32_mb_arithmetic=round(tokens * v * 4 / 2**20, 1))
        print(f"vocab {v}: unfused {med[False][1]:.0f} MB {tokens / med[False][0]:.0f} tok/s | fused "
              f"{med[True][1]:.0f} MB {tokens / med[True][0]:.0f} tok/s", flush=True)
        rows.append(result("fused_kernels", f"step_peak_mb_v{v}", False, round(med[True][1], 1),
                           "unfused LM head + F.cross_entropy", round(med[False][1], 1), **common))
        rows.append(result("fused_kernels", f"step_tokens_per_s_v{v}", True, round(tokens / med[True][0], 1),
                           "unfused LM head + F.cross_entropy", round(tokens / med[False][0], 1), **common))
        del model, runs
        gc.collect()
    return rows


def saved_bytes(fn) -> int:
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn()
    return sum(total)


def unfused_rms(x, w, eps=1e-6):  # norms.RMSNorm's math
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def unfused_swiglu(g, u):
    return F.silu(g) * u


def kernel_rows(repeats: int) -> list[dict]:
    n, d, f = 4096, 512, 1408
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(d, requires_grad=True)
    g = torch.randn(n, f, requires_grad=True)
    u = torch.randn(n, f, requires_grad=True)
    t0 = time.perf_counter()
    c_rms, c_swi = torch.compile(unfused_rms, dynamic=True), torch.compile(unfused_swiglu, dynamic=True)
    variants = {
        "rmsnorm": {"unfused": lambda: unfused_rms(x, w), "function_eager": lambda: rms_norm(x, w, 1e-6, "eager"),
                    "function_compiled": lambda: rms_norm(x, w, 1e-6, "compiled"),
                    "compile_unfused": lambda: c_rms(x, w)},
        "swiglu": {"unfused": lambda: unfused_swiglu(g, u), "function_eager": lambda: swiglu(g, u, "eager"),
                   "function_compiled": lambda: swiglu(g, u, "compiled"), "compile_unfused": lambda: c_swi(g, u)},
    }
    compile_secs = {}
    for op, vs in variants.items():
        for name, fn in vs.items():
            start = time.perf_counter()
            fn().sum().backward()  # first call compiles where there is something to compile
            compile_secs[(op, name)] = time.perf_counter() - start
    print(f"first calls (compilation) took {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for op, vs in variants.items():
        times = {k: [] for k in vs}
        for _ in range(repeats):
            for name, fn in vs.items():
                start = time.perf_counter()
                fn().sum().backward()
                times[name].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        mem = {k: saved_bytes(fn) / 2**20 for k, fn in vs.items() if k in ("unfused", "function_eager")}
        shape = [n, d] if op == "rmsnorm" else [n, f]
        print(f"{op}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()) +
              f"; saved for backward: unfused {mem['unfused']:.1f} MB, fused {mem['function_eager']:.1f} MB", flush=True)
        for name in ("function_eager", "function_compiled", "compile_unfused"):
            rows.append(result("fused_kernels", f"{op}_ms_{name}", False, round(ms[name], 2), "unfused eager",
                               round(ms["unfused"], 2), shape=shape, op="forward+backward", repeats=repeats,
                               first_call_seconds=round(compile_secs[(op, name)], 1), machine=MACHINE,
                               threads=torch.get_num_threads()))
        rows.append(result("fused_kernels", f"{op}_saved_mb", False, round(mem["function_eager"], 2),
                           "unfused eager", round(mem["unfused"], 2), shape=shape, machine=MACHINE))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = head_rows(args.vocabs, args.tokens, args.repeats)
    rows += kernel_rows(max(args.repeats, 5))
    write_result("fused_kernels", rows)


if __name__ == "__main__":
    main()
