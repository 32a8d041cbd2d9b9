"""Attention backends: SDPA vs the blockwise FlashAttention reference vs naive, T = 256 ... 4096.

Each (backend, T) runs in its own subprocess so its peak memory (RSS growth over the inputs) is
isolated. The claim under test: naive attention's peak memory grows quadratically with T (it
materialises T×T scores), the blockwise backend's only linearly (one tile of scores at a time).
Ratios: time and memory of blockwise and SDPA against naive (>1 = less than naive).

Usage:
    python benchmarks/attention.py            # full sweep (a few minutes)
    python benchmarks/attention.py --quick    # T up to 1024
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

B, H, D = 1, 8, 64


def worker(backend: str, t: int) -> dict:
    import torch

    from lmstack.model.backends import BACKENDS
    from lmstack.model.masks import AttentionMask

    torch.set_num_threads(2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
    pos = torch.arange(t)
    # A causal mask given as a rule the backends must honour (not SDPA's is_causal shortcut), with a
    # window wider than T so every backend computes the full causal triangle.
    mask = AttentionMask(q_pos=pos, k_pos=pos, causal=True, window=t + 1)
    fn = BACKENDS[backend]
    reset_peak_rss()
    base = rss_mb()
    start = time.perf_counter()
    fn(q, k, v, mask, D ** -0.5)
    first = time.perf_counter() - start
    peak_mb = peak_rss_mb() - base
    times = [first]
    for _ in range(2 if t <= 2048 else 1):
        start = time.perf_counter()
        fn(q, k, v, mask, D ** -0.5)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mb": peak_mb}


def main(quick: bool = False) -> None:
    lengths = [256, 512, 1024] if quick else [256, 512, 1024, 2048, 4096]
    rows = {}
    for t in lengths:
        for backend in ("naive", "blockwise", "sdpa"):
            out = subprocess.run([sys.executable, __file__, "--worker", backend, str(t)], capture_output=True,
                                 text=True, check=True)
            rows[(backend, t)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"T={t:5d} {backend:9s} {rows[(backend, t)]['seconds'] * 1e3:9.1f} ms  "
                  f"peak +{rows[(backend, t)]['peak_mb']:8.1f} MB", flush=True)
    results = []
    for t in lengths:
        naive = rows[("naive", t)]
        for backend in ("blockwise", "sdpa"):
            r = rows[(backend, t)]
            results.append(result("attention", f"peak_mb_{backend}_T{t}", False, r["peak_mb"], "naive attention",
                                  naive["peak_mb"], B=B, H=H, D=D, T=t, mask="causal rule"))
            results.append(result("attention", f"seconds_{backend}_T{t}", False, r["seconds"], "naive attention",
                                  naive["seconds"], B=B, H=H, D=D, T=t, mask="causal rule"))
    # growth exponents between the shortest and longest T: ~2 means quadratic, ~1 linear
    import math

    lo, hi = lengths[0], lengths[-1]
    for backend in ("naive", "blockwise", "sdpa"):
        a, b = max(rows[(backend, lo)]["peak_mb"], 0.5), max(rows[(backend, hi)]["peak_mb"], 0.5)
        print(f"{backend}: peak memory grows as T^{math.log(b / a) / math.log(hi / lo):.2f} from T={lo} to T={hi}")
    write_result("attention", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main(quick="--quick" in sys.argv)
