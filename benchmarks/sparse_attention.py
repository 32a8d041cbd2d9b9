"""Sparse attention at T=4096: time and peak memory against SDPA dense, the default backend.

Each sparse pattern (sliding windows, Longformer, BigBird, dilated) runs two ways:
  - blockwise: our FlashAttention-2 backend, which skips the tiles the pattern hides entirely;
  - sdpa+mask: the default backend given the pattern, i.e. torch SDPA with the pattern's dense bool mask
    (what `attn_backend: sdpa` does with a sparse_pattern), which computes every score and then masks.
The baseline a user would compare against is SDPA dense causal (is_causal=True, torch's flash kernel on
CPU): the cost of not using a sparse pattern at all. We also keep blockwise dense causal, our own
reference, to show what the tile skipping alone buys.

Forward only (no_grad), B=1, H=8, D=64, fp32, 1 thread. Each (way, pattern) runs in its own subprocess
so its peak RSS growth is isolated; two repeats alternate the order and we keep the median.
Ratios: baseline / ours (>1 = ours cheaper).

Usage:
    python benchmarks/sparse_attention.py
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from _common import peak_and_seconds, result, write_result

T, B, H, D, BLOCK = 4096, 1, 8, 64, 128

PATTERNS = {  # name (used in metric names) -> (ModelConfig overrides, layer window)
    "dense_causal": (dict(), 0),
    "window1024": (dict(sliding_window=1024), 1024),
    "window256": (dict(sliding_window=256), 256),
    "longformer_w256_g64": (dict(sliding_window=256, sparse_pattern="longformer", sparse_global_tokens=64), 256),
    "bigbird_w256_g64_r2": (dict(sliding_window=256, sparse_pattern="bigbird", sparse_global_tokens=64,
                                 sparse_random_blocks=2), 256),
    "dilated_w128_d4": (dict(sliding_window=128, sparse_pattern="dilated", sparse_dilation=4), 128),
}


def _mask(name: str):
    import torch

    from lmstack.model import ModelConfig
    from lmstack.model.masks import mask_for

    overrides, window = PATTERNS[name]
    pos = torch.arange(T)
    return mask_for(ModelConfig(attn_block_size=BLOCK, **overrides), pos, pos, window)


def worker(way: str, name: str) -> dict:
    import torch

    from lmstack.model.backends import blockwise_attention, sdpa_attention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = _mask(name)
    if way == "blockwise":
        fn = lambda: blockwise_attention(q, k, v, mask, D ** -0.5, block_q=BLOCK, block_k=BLOCK)
    else:  # sdpa: is_causal for the plain causal square, the pattern's dense bool mask otherwise
        fn = lambda: sdpa_attention(q, k, v, mask, D ** -0.5)
    with torch.no_grad():
        return peak_and_seconds(fn)


def main() -> None:
    repeats = 2
    runs = {}
    for rep in range(repeats):
        ways = ("blockwise", "sdpa") if rep % 2 == 0 else ("sdpa", "blockwise")
        for name in PATTERNS:
            for way in ways:
                out = subprocess.run([sys.executable, __file__, "--worker", way, name], capture_output=True, text=True,
                                     check=True)
                r = runs.setdefault((way, name), [])
                r.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"rep {rep} {name:22s} {way:9s} {r[-1]['seconds'] * 1e3:8.1f} ms  "
                      f"peak +{r[-1]['peak_mb']:7.1f} MB",
                      flush=True)
    med = {key: {m: statistics.median(x[m] for x in rs) for m in ("seconds", "peak_mb")} for key, rs in runs.items()}
    common = dict(T=T, B=B, H=H, D=D, block=BLOCK, dtype="float32", threads=1, repeats=repeats, pass_="forward",
                  machine="2 cores, shared")
    sdpa_dense, ours_dense = med[("sdpa", "dense_causal")], med[("blockwise", "dense_causal")]
    results = [result("sparse_attention", f"{m}_blockwise_dense_causal", False,
                      ours_dense[m], "torch SDPA dense causal (is_causal)", sdpa_dense[m], **common)
               for m in ("seconds", "peak_mb")]
    for name in PATTERNS:
        if name == "dense_causal":
            continue
        density = round(float(_mask(name).dense().float().mean()), 4)
        ours = med[("blockwise", name)]
        for m in ("seconds", "peak_mb"):
            results.append(result("sparse_attention", f"{m}_{name}", False, ours[m],
                                  "torch SDPA dense causal (is_causal)", sdpa_dense[m], visible_fraction=density,
                                  **common))
            results.append(result("sparse_attention", f"{m}_{name}_vs_sdpa_mask", False, ours[m],
                                  "torch SDPA with the pattern's dense mask", med[("sdpa", name)][m],
                                  visible_fraction=density, **common))
            results.append(result("sparse_attention", f"{m}_{name}_vs_blockwise_dense", False, ours[m],
                                  "blockwise dense causal (our reference)", ours_dense[m], visible_fraction=density,
                                  **common))
    write_result("sparse_attention", results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
    else:
        main()
