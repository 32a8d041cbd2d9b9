"""The paged pool's short-chunk attention through torch's flex_attention, beside SDPA: attention_backend='flex'.

PagedKVCache batches decode tokens and speculative windows into one padded attention per layer: B rows,
the query heads of a KV group folded into extra query rows (G * Tq of them), keys gathered from the pool
into (B, Hkv, L, D). SDPA needs a materialised (B, 1, G*Tq, L) boolean mask for that; flex_attention
takes the rule itself as a score_mod over (batch, head, query, key) indices: a key is visible when its
position is at most the query's (causal; this also hides the padding keys of shorter rows) and, with a
sliding window, within it. Folded query row r is query r % Tq of its row.

On CUDA flex_attention only runs fast compiled (torch.compile generates one Triton kernel); eagerly (the
CPU tests) it is a reference implementation over the same score_mod, so the CPU proves the rule and
the GPU measures the speed (benchmarks/cuda_check.py, benchmarks/engine_gpu.py).

Usage (paged_attention.py does this when the engine runs with attention_backend='flex'):
    out = flex_short(qs, keys, values, q_pos, window=0, scale=0.125)   # qs (B, Hkv, G*Tq, D), q_pos (B, Tq)
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention

def _flex_short(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor, window: int,
                scale: float) -> torch.Tensor:
    tq = q_pos.shape[1]

    def visible(score, b, h, q, kv):
        qp = q_pos[b, q % tq]
        ok = kv <= qp
        if window:
            ok = ok & (kv > qp - window)
        return torch.where(ok, score, float("-inf"))

    return flex_attention(qs, keys, values, score_mod=visible, scale=scale)


# compiled whole (the score_mod is made inside the traced function, so a new closure per call is no new
# guard); built on first CUDA use, one per process
_compiled: dict[str, object] = {}


def flex_short(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor, window: int,
               scale: float) -> torch.Tensor:
    """Folded queries (B, Hkv, G*Tq, D) over gathered keys (B, Hkv, L, D) -> (B, Hkv, G*Tq, D)."""
    if qs.device.type != "cuda":
        return _flex_short(qs, keys, values, q_pos, window, scale)
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(_flex_short)
    return _compiled["cuda"](qs, keys, values, q_pos, window, scale)
