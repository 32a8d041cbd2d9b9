"""The segment loop every long-context memory shares: argument checks, a long input run segment by segment
through a memory, and the loss over it (xl.py, compressive.py, knn.py and segments.py all use it).

A memory with an `attach()` context (XL and the compressive memory, whose hooks read each layer's input) is
run inside it; a memory's own `aux_loss` (the compressive memory's attention-reconstruction loss) is added to
the blocks' auxiliary losses, averaged over segments.

Usage:
    check_segment_call(ids, seg_len, targets)
    logits, aux = run_segments(model, ids, seg_len, memory)          # (B, T, vocab), mean aux over segments
    loss = segment_loss(logits, targets) + aux
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError


def check_segment_call(ids: torch.Tensor, seg_len: int, targets: torch.Tensor | None = None) -> None:
    """Refuse ids that are not (batch, time), a seg_len < 1 and targets of another shape, naming which."""
    if ids.dim() != 2:
        raise LmstackError(f"input ids must have shape (batch, time), got {tuple(ids.shape)}")
    if seg_len < 1:
        raise LmstackError(f"seg_len must be >= 1, got {seg_len}")
    if targets is not None and targets.shape != ids.shape:
        raise LmstackError(f"targets must have the shape of ids {tuple(ids.shape)}, got {tuple(targets.shape)}")


def run_segments(model: nn.Module, ids: torch.Tensor, seg_len: int, memory,
                 return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | float]:
    """model over ids (B, T) in segments of seg_len with `memory` as the cache (updated in place):
    (logits, or final hidden states with return_hidden, (B, T, ...); the mean over segments of the blocks'
    aux loss plus the memory's own)."""
    attach = getattr(memory, "attach", None)
    outs, aux = [], 0.0
    with attach() if attach is not None else contextlib.nullcontext():
        for segment in ids.split(seg_len, dim=1):
            outs.append(model(segment, cache=memory, return_hidden=return_hidden))
            aux = aux + model.aux_loss
            extra = getattr(memory, "aux_loss", None)
            if torch.is_tensor(extra):
                aux = aux + extra
    return torch.cat(outs, dim=1), aux / len(outs)


def segment_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, vocab) over targets (B, T) != ignore_index."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
