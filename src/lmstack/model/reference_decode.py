"""A small reference decode loop on top of the KV caches: greedy or sampled, one token at a time.

The full inference engine (paged cache, batching, the complete sampling suite) is lmstack.infer;
this loop is the ground truth it is checked against, and what `lmstack model generate` uses.

Usage:
    out = reference_decode(model, torch.tensor([[1, 2, 3]]), max_new_tokens=20)                  # greedy
    out = reference_decode(model, ids, max_new_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=0)
    out = reference_decode(model, ids, max_new_tokens=5000, cache="sink", window=256)   # unbounded
    out = reference_decode(model, ids, max_new_tokens=20, cache=None)   # no cache: re-runs the prefix each step
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, vocab): argmax at temperature 0, else top-k/top-p sampling."""
    if temperature < 0:
        raise LmstackError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise LmstackError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def reference_decode(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, eos_id: int | None = None, cache: str | None = "contiguous",
                     window: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens tokens; stops early once every row emitted eos_id."""
    if idx.dim() == 1:
        idx = idx[None]
    if idx.shape[1] == 0:
        raise LmstackError("the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise LmstackError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    b, t = idx.shape
    max_len = model.config.max_seq_len
    kv = None
    if cache == "contiguous":
        if model.config.position == "learned" and t + max_new_tokens > max_len:
            raise LmstackError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={max_len}")
        kv = model.new_cache(b, max_len=max(t + max_new_tokens, 1))
    elif cache == "sink":
        kv = model.new_cache(b, kind="sink", window=window)
    elif cache is not None:
        raise LmstackError(f"unknown cache {cache!r}; choose 'contiguous', 'sink' or None")
    out = idx
    finished = torch.zeros(b, dtype=torch.bool, device=idx.device)
    step_input = idx
    for _ in range(max_new_tokens):
        logits = model(step_input if kv is not None else out, cache=kv, logits_to_keep=1)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        out = torch.cat((out, nxt[:, None]), dim=1)
        step_input = nxt[:, None]
        if eos_id is not None and bool(finished.all()):
            break
    return out
