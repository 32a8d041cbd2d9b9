"""Sparse attention: the blockwise backend skips fully masked tiles, so time falls with sparsity.

At T=4096 we time the blockwise backend under a dense causal mask (the baseline) and under sliding
windows, Longformer, BigBird and dilated patterns, and report the fraction of visible (q, k) pairs
next to the speedup. Ratio = dense time / sparse time (>1 = faster).

Usage:
    python benchmarks/sparse_attention.py
"""
from __future__ import annotations

import torch

from _common import result, timeit, write_result

from lmstack.model import ModelConfig
from lmstack.model.backends import blockwise_attention
from lmstack.model.masks import mask_for

T, B, H, D, BLOCK = 4096, 1, 8, 64, 128


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pos = torch.arange(T)
    patterns = {
        "dense causal": (ModelConfig(attn_block_size=BLOCK), 0),
        "window 1024": (ModelConfig(attn_block_size=BLOCK, sliding_window=1024), 1024),
        "window 256": (ModelConfig(attn_block_size=BLOCK, sliding_window=256), 256),
        "longformer w256 g64": (ModelConfig(attn_block_size=BLOCK, sliding_window=256, sparse_pattern="longformer",
                                            sparse_global_tokens=64), 256),
        "bigbird w256 g64 r2": (ModelConfig(attn_block_size=BLOCK, sliding_window=256, sparse_pattern="bigbird",
                                            sparse_global_tokens=64, sparse_random_blocks=2), 256),
        "dilated w128 d4": (ModelConfig(attn_block_size=BLOCK, sliding_window=128, sparse_pattern="dilated",
                                        sparse_dilation=4), 128),
    }
    times, density = {}, {}
    for name, (cfg, window) in patterns.items():
        mask = mask_for(cfg, pos, pos, window)
        density[name] = float(mask.dense().float().mean())
        times[name] = timeit(lambda: blockwise_attention(q, k, v, mask, D ** -0.5, block_q=BLOCK, block_k=BLOCK),
                             repeat=2)
        print(f"{name:22s} visible {density[name] * 100:5.1f}%  {times[name] * 1e3:8.1f} ms", flush=True)
    base = times["dense causal"]
    results = [result("sparse_attention", f"seconds[{name}]", False, times[name], "blockwise dense causal", base,
                      T=T, H=H, D=D, block=BLOCK, visible_fraction=round(density[name], 4))
               for name in patterns if name != "dense causal"]
    write_result("sparse_attention", results)


if __name__ == "__main__":
    main()
