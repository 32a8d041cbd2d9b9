"""Linear attention vs softmax attention as T grows: time and peak memory.

Performer (causal, 256 random features) and Linformer (bidirectional, k=256) against torch SDPA of the
same causality (the default backend: is_causal for causal, no mask for bidirectional; on CPU both run
torch's flash kernel) and against naive softmax attention (our T×T reference, T <= 4096), forward only
(no_grad), B=1, H=8, D=64, fp32, 1 thread, T = 1024 ... 8192. Each (kind, T) runs in its own
subprocess so its peak RSS growth is isolated; two repeats alternate the order and we keep the median.
Ratios are baseline / ours (>1 = the linear method is cheaper).

Usage:
    python benchmarks/linear_attention.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import peak_rss_mb, reset_peak_rss, result, rss_mb, write_result

B, H, D = 1, 8, 64


def worker(kind: str, t: int) -> dict:
    import torch

    from lmstack.model import ModelConfig
    from lmstack.model.backends import naive_attention, sdpa_attention
    from lmstack.model.linear_attention import LinformerAttention, PerformerAttention
    from lmstack.model.masks import AttentionMask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, t, D) for _ in range(3))
    pos = torch.arange(t)
    causal = kind in ("performer", "naive_causal", "sdpa_causal")
    if kind == "performer":
        att = PerformerAttention(ModelConfig(d_model=H * D, n_heads=H, performer_features=256), chunk=128)
        fn = lambda: att(q, k, v, causal=True)
    elif kind == "linformer":
        att = LinformerAttention(ModelConfig(d_model=H * D, n_heads=H, max_seq_len=t, linformer_k=256, causal=False))
        fn = lambda: att(q, k, v, causal=False)
    else:
        mask = AttentionMask(q_pos=pos, k_pos=pos, causal=causal)
        base = naive_attention if kind.startswith("naive") else sdpa_attention
        fn = lambda: base(q, k, v, mask, D ** -0.5)
    with torch.no_grad():
        reset_peak_rss()
        rss0 = rss_mb()
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        peak = peak_rss_mb() - rss0
        start = time.perf_counter()
        fn()
        second = time.perf_counter() - start
    return {"seconds": min(first, second), "peak_mb": peak}


KINDS = ("performer", "sdpa_causal", "naive_causal", "linformer", "sdpa_bidir", "naive_bidir")
PAIRS = (("performer", "sdpa_causal"), ("linformer", "sdpa_bidir"), ("performer", "naive_causal"),
         ("linformer", "naive_bidir"))


def main() -> None:
    import statistics

    lengths = [1024, 2048, 4096, 8192]
    repeats = 2
    runs = {}
    for rep in range(repeats):
        for t in lengths:
            for kind in (KINDS if rep % 2 == 0 else KINDS[::-1]):
                if kind.startswith("naive") and t > 4096:
                    continue  # 8192² fp32 scores per head would need ~2 GiB for each of several tensors
                out = subprocess.run([sys.executable, __file__, "--worker", kind, str(t)], capture_output=True,
                                     text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((kind, t), []).append(r)
                print(f"rep {rep} T={t:5d} {kind:13s} {r['seconds'] * 1e3:9.1f} ms  peak +{r['peak_mb']:8.1f} MB",
                      flush=True)
    rows = {key: {m: statistics.median(x[m] for x in rs) for m in ("seconds", "peak_mb")} for key, rs in runs.items()}
    results = []
    for t in lengths:
        for ours, base in PAIRS:
            if (base, t) not in rows:
                continue
            name = "torch SDPA" if base.startswith("sdpa") else "naive softmax"
            name += " causal (is_causal)" if base.endswith("causal") else " bidirectional"
            for metric in ("seconds", "peak_mb"):
                results.append(result("linear_attention", f"{metric}_{ours}_vs_{base}_T{t}", False,
                                      rows[(ours, t)][metric], name, rows[(base, t)][metric], T=t, B=B, H=H, D=D,
                                      features=256, linformer_k=256, threads=1, repeats=repeats, pass_="forward",
                                      machine="2 cores, shared"))
    write_result("linear_attention", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
