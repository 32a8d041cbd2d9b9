"""Running a memory model (ModelConfig.memory = xl | compressive | knn) over a long input, and decoding with it.

A memory model reads past its segment through a memory (xl.py, compressive.py, knn.py), so a long input
is not one forward: it is cut into segments of cfg.memory_seg_len() tokens, each run with the memory the
segments before it left. `Transformer.forward` calls `segment_forward` whenever a memory model runs without
a cache, so `model(ids)`, the trainer's objectives (which ask for hidden states) and perplexity all see
the memory; a memory passed as `cache=` (to carry it across calls, or a persistent kNN store) runs one
segment as any cache does.

Decoding cannot go through the paged engine (its KV cache has no slot for a memory, and the engine refuses
these models); `generate_with_memory` is the path:
- xl / compressive: the prompt runs segment by segment, then each new token is a segment of one, so the
  memory slides by one token per step (Transformer-XL's evaluation with memory reuse). A step attends over
  the memory; its cost is O(mem_len), not O(tokens so far);
- knn: local attention needs the current segment's tokens, so each step re-runs the open segment (up to
  seg_len tokens) with the store read-only, and a segment that fills up is committed to the store.

Usage:
    memory = new_memory(model)                              # from model.config, empty
    hidden = segment_forward(model, ids)                    # what model(ids, return_hidden=True) runs
    out = generate_with_memory(model, prompt_ids, max_new_tokens=16)              # greedy
    out = generate_with_memory(model, prompt_ids, 16, memory=KNNMemory.load("mem/", model))   # persistent store
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.attention_cache import AttentionCache
from lmstack.model.memory.compressive import CompressiveMemory
from lmstack.model.memory.knn import KNNMemory
from lmstack.model.memory.running import run_segments
from lmstack.model.memory.xl import XLMemory


def new_memory(model: nn.Module) -> AttentionCache:
    """An empty memory of the kind and sizes model.config names."""
    cfg = model.config
    if cfg.memory == "xl":
        return XLMemory(model, cfg.mem_len)
    if cfg.memory == "compressive":
        return CompressiveMemory(model)
    if cfg.memory == "knn":
        return KNNMemory(model, cfg.memory_layer(), capacity=cfg.knn_capacity, top_k=cfg.knn_top_k)
    raise LmstackError(f"memory={cfg.memory!r}: this model has no long-context memory (set ModelConfig.memory)")


def segment_forward(model: nn.Module, ids: torch.Tensor, memory: AttentionCache | None = None) -> torch.Tensor:
    """Final hidden states (B, T, d_model) of ids run segment by segment through `memory` (a fresh one when
    None). Leaves model.aux_loss = the mean over segments of the blocks' auxiliary losses plus the memory's
    own (the compressive memory's attention-reconstruction loss), as the trainer reads it."""
    memory = new_memory(model) if memory is None else memory
    hidden, model.aux_loss = run_segments(model, ids, model.config.memory_seg_len(), memory, return_hidden=True)
    return hidden


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_with_memory(model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
                         memory: AttentionCache | None = None, temperature: float = 0.0,
                         eos_id: int | None = None, generator: torch.Generator | None = None,
                         commit: bool = False) -> torch.Tensor:
    """Continue ids (B, T) by up to max_new_tokens tokens with the model's memory: (B, T + new) token ids.

    `memory` (updated in place) carries what earlier calls left, e.g. a KNNMemory loaded from disk; a
    fresh one is made when None. Greedy when temperature <= 0. Stops early when every row has emitted eos_id.
    commit: a kNN memory stores only finished segments while decoding; commit=True also stores the open one
    at the end (the conversation is over: a later one should recall all of it)."""
    cfg = model.config
    if cfg.memory == "none" and memory is None:
        raise LmstackError("generate_with_memory needs a memory model (ModelConfig.memory) or a memory= cache; "
                           "decode a plain model with lmstack.LLM or model.generate")
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise LmstackError(f"prompt ids must have shape (batch, time) with time >= 1, got {tuple(ids.shape)}")
    if max_new_tokens < 0:
        raise LmstackError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    memory = new_memory(model) if memory is None else memory
    if not getattr(memory, "long_memory", False):
        raise LmstackError(f"memory= must be a long-context memory (new_memory(model), XLMemory, CompressiveMemory "
                           f"or KNNMemory), got {type(memory).__name__}")
    seg_len = cfg.memory_seg_len() if cfg.memory != "none" else cfg.max_seq_len
    out = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    if isinstance(memory, KNNMemory):
        # Segments aligned as in training: whole ones go to the store, the open one is re-run each step.
        n_full = (ids.shape[1] - 1) // seg_len * seg_len
        for start in range(0, n_full, seg_len):
            model(ids[:, start:start + seg_len], cache=memory)
        open_ = ids[:, n_full:]
        for _ in range(max_new_tokens):
            with memory.read_only():
                logits = model(open_, cache=memory, logits_to_keep=1)[:, -1]
            nxt = _pick(logits, temperature, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            open_ = torch.cat((open_, nxt[:, None]), dim=1)
            if open_.shape[1] > seg_len:  # the open segment is full: store it, keep the newest token open
                model(open_[:, :seg_len], cache=memory)
                open_ = open_[:, seg_len:]
            if eos_id is not None and bool(done.all()):
                break
        if commit:
            model(open_, cache=memory)
        return out
    with memory.attach():
        hidden_last = None
        for segment in ids.split(seg_len, dim=1):
            logits = model(segment, cache=memory, logits_to_keep=1)
            hidden_last = logits[:, -1]
        logits = hidden_last
        for step in range(max_new_tokens):
            nxt = _pick(logits, temperature, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=memory)[:, -1]
    return out
