"""The skinny GEMM kernel (lmstack.kernels) against MKL on llama-base's decode matmuls, in GB/s of weights read.

Part 1, per weight shape of llama-base (fused qkv, o, fused gate_up, down, head) and rows M in 1..64:
GB/s of weights read by
  ours        the kernel, W in nn.Linear's (out, in) layout
  mkl         F.linear(x, W) (torch's path, MKL)
  x @ Wt      x @ W.t().contiguous(): MKL on a transposed copy (a re-layout of the model's weights)
Each timed pass multiplies x by every one of enough weight copies (>= --min-mb MB together) that each pass reads
DRAM, not cache. Repeats are interleaved (ours, mkl, x @ Wt, then again) so contention on a shared machine hits
all alike; the best pass of each counts. The machine's read bandwidth (x.sum() over 512 MB) is measured in the
same loop. The kernel is timed directly (no wrapper), also past MAX_ROWS (M = 64, which skinny_linear sends to
MKL) to show the crossover.

Part 2, the number that matters: one llama-base decode step's matmuls (12 layers x (qkv, o, gate_up, down) +
head, distinct weights, ~395 MB) at M = 1 and M = 8 rows, through skinny_linear and through F.linear:
tokens/s bound by the matmuls alone (M / step time), as a fraction of the bandwidth bound (bandwidth / bytes
per step, times M), and the step time at M = 8 over M = 1 (the per-token latency of a request among 8
concurrent ones over a lone request, for the matmul share of a step).

Usage:
    python benchmarks/cpu_gemv.py                    # ~4-7 minutes on 2 shared cores
    python benchmarks/cpu_gemv.py --repeats 3 --rows 1 8
    python benchmarks/cpu_gemv.py --threads 1          # -> results/cpu_gemv_t1.json
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from _common import result, write_result
from lmstack.kernels import MAX_ROWS, build, info
from lmstack.kernels import skinny_linear
from lmstack.model import preset

NAME = "cpu_gemv"  # with --threads other than 2: cpu_gemv_t<threads>


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each decode matmul of one layer, qkv and gate_up fused as issue 18 plans, plus the head."""
    kv = cfg.n_kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    return {"qkv": (q + 2 * kv, cfg.d_model), "o": (cfg.d_model, q), "gate_up": (2 * cfg.d_ff, cfg.d_model),
            "down": (cfg.d_model, cfg.d_ff), "head": (cfg.vocab_size, cfg.d_model)}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth_pass(buf: torch.Tensor) -> float:
    """GB/s of one x.sum() over buf."""
    return buf.numel() * 4 / seconds(buf.sum) / 1e9


def part1(cfg, rows: list[int], repeats: int, min_mb: float, bw_buf: torch.Tensor,
          ext) -> tuple[list[dict], list[float]]:
    out, bw_all = [], []
    for name, (O, I) in shapes(cfg).items():
        copies = max(2, int(min_mb * 1e6 / (O * I * 4)) + 1)
        ws = [torch.randn(O, I) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        nbytes = copies * O * I * 4
        for M in rows:
            x = torch.randn(M, I)
            runs = {"ours": lambda: [ext.skinny_linear(x, w, None) for w in ws],
                    "mkl": lambda: [F.linear(x, w) for w in ws],
                    "xWt": lambda: [x @ wt for wt in wts]}
            for fn in runs.values():
                fn()  # warm: first-touch, thread pool
            best = {k: 0.0 for k in runs}
            for _ in range(repeats):
                for k, fn in runs.items():
                    best[k] = max(best[k], nbytes / seconds(fn) / 1e9)
                bw_all.append(bandwidth_pass(bw_buf))
            bw = max(bw_all)
            out.append(result(NAME, f"gbps_M{M}_{name}", True, round(best["ours"], 2), "F.linear (MKL)",
                              round(best["mkl"], 2), out_features=O, in_features=I, rows=M,
                              weight_mb_per_pass=round(nbytes / 1e6, 1), xWt_gbps=round(best["xWt"], 2),
                              ours_over_xWt=round(best["ours"] / best["xWt"], 3),
                              read_bandwidth_gbps_so_far=round(bw, 2),
                              ours_fraction_of_bandwidth=round(best["ours"] / bw, 3),
                              through_skinny_linear=M <= MAX_ROWS))
            print(f"{name:8s} {O}x{I} M={M:2d}: ours {best['ours']:5.1f}  mkl {best['mkl']:5.1f}  "
                  f"x@Wt {best['xWt']:5.1f} GB/s   (read bandwidth {bw:.1f})", flush=True)
        del ws, wts
    return out, bw_all


def part2(cfg, repeats: int, bw_buf: torch.Tensor, bw_all: list[float]) -> list[dict]:
    sh = shapes(cfg)
    layers = [{k: torch.randn(*sh[k]) for k in ("qkv", "o", "gate_up", "down")} for _ in range(cfg.n_layers)]
    head = torch.randn(*sh["head"])
    nbytes = sum(w.numel() * 4 for layer in layers for w in layer.values()) + head.numel() * 4

    def step(linear, x_model, x_ff):
        for layer in layers:
            linear(x_model, layer["qkv"])
            linear(x_model, layer["o"])
            linear(x_model, layer["gate_up"])
            linear(x_ff, layer["down"])
        linear(x_model, head)

    out, times = [], {}
    with torch.inference_mode():
        for M in (1, 8):
            xm, xf = torch.randn(M, cfg.d_model), torch.randn(M, cfg.d_ff)
            runs = {"ours": lambda: step(skinny_linear, xm, xf), "mkl": lambda: step(F.linear, xm, xf)}
            for fn in runs.values():
                fn()
            best = {k: float("inf") for k in runs}
            for _ in range(repeats):
                for k, fn in runs.items():
                    best[k] = min(best[k], seconds(fn))
                bw_all.append(bandwidth_pass(bw_buf))
            times[M] = best
    bw = max(bw_all)
    for M in (1, 8):
        best = times[M]
        bound = M * bw * 1e9 / nbytes  # tokens/s if the step only had to read its weights once at full bandwidth
        ours_tps, mkl_tps = M / best["ours"], M / best["mkl"]
        out.append(result(NAME, f"decode_step_matmul_tokens_per_s_M{M}", True, round(ours_tps, 1), "F.linear (MKL)",
                          round(mkl_tps, 1), rows=M, weight_mb_per_step=round(nbytes / 1e6, 1),
                          read_bandwidth_gbps=round(bw, 2), bandwidth_bound_tokens_per_s=round(bound, 1),
                          ours_fraction_of_bound=round(ours_tps / bound, 3),
                          mkl_fraction_of_bound=round(mkl_tps / bound, 3),
                          ours_step_ms=round(best["ours"] * 1e3, 2), mkl_step_ms=round(best["mkl"] * 1e3, 2)))
        print(f"decode step M={M}: ours {ours_tps:.1f} tok/s ({ours_tps / bound:.0%} of bound), "
              f"MKL {mkl_tps:.1f} ({mkl_tps / bound:.0%}); bound {bound:.1f}", flush=True)
    ours_r = times[8]["ours"] / times[1]["ours"]
    mkl_r = times[8]["mkl"] / times[1]["mkl"]
    out.append(result(NAME, "decode_step_matmul_time_M8_over_M1", False, round(ours_r, 3), "F.linear (MKL)",
                      round(mkl_r, 3), goal=2.0, meaning="per-token latency among 8 concurrent requests over a lone "
                      "request, matmul share of a step"))
    print(f"step time M=8 / M=1: ours {ours_r:.2f}x, MKL {mkl_r:.2f}x", flush=True)
    out.append(result(NAME, "read_bandwidth_gbps", True, round(bw, 2), "same measurement", round(bw, 2),
                      how="best x.sum() over a 512 MB fp32 tensor, interleaved with every part above",
                      median=round(sorted(bw_all)[len(bw_all) // 2], 2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per method and shape")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="x rows (M) for part 1")
    ap.add_argument("--step-repeats", type=int, default=20, help="interleaved timed decode steps per method (part 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-mb", type=float, default=400.0, help="weight copies per pass, MB (beyond the caches)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global NAME
    NAME = "cpu_gemv" if args.threads == 2 else f"cpu_gemv_t{args.threads}"
    ext = build.extension()
    if ext is None:
        raise SystemExit(f"the skinny kernel is not available here: {info()}")
    cfg = preset("llama-base")
    bw_buf = torch.ones(128 * 1024 * 1024)  # 512 MB
    with torch.inference_mode():
        res, bw_all = part1(cfg, args.rows, args.repeats, args.min_mb, bw_buf, ext)
    res += part2(cfg, args.step_repeats, bw_buf, bw_all)
    common = {"machine": "2 cores, shared" if (os.cpu_count() or 0) <= 2 else f"{os.cpu_count()} cores",
              "threads": args.threads, "repeats": args.repeats, "step_repeats": args.step_repeats,
              "isa": info()["isa"], "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "max_rows": MAX_ROWS, "model": "llama-base"}
    for r in res:
        r["config"] = {**common, **r["config"]}
    write_result(NAME, res)


if __name__ == "__main__":
    main()
