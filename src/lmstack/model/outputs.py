"""The HF-style forward's output and loss: what transformers' Trainer and TRL's trainers expect back.

`model(input_ids=..., attention_mask=..., labels=...)` (keyword input_ids, or any labels) returns a
CausalLMOutput instead of a bare logits tensor. It is a dict, as transformers' ModelOutput is, because
Trainer reads `outputs["loss"]` from dicts and `outputs[0]` from anything else; attribute access
(`out.loss`, `out.logits`) and integer indexing over the fields that are set work too.

The loss is transformers' causal-LM loss: logits upcast to fp32, labels shifted left by one (the
position t predicts label t+1), positions labelled -100 ignored, mean over the rest.

Usage:
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward(); out.logits.shape           # (B, T, vocab)
    loss = causal_lm_loss(logits, labels)           # the same loss from logits you already have
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError

IGNORE_INDEX = -100


class CausalLMOutput(dict):
    """loss (scalar, only when labels were given), logits (B, T, vocab), aux_loss (MoE routing loss)."""

    def __init__(self, logits: torch.Tensor, loss: torch.Tensor | None = None,
                 aux_loss: torch.Tensor | None = None):
        super().__init__()
        # Unset fields are left out, as in ModelOutput, so outputs[0] is the loss exactly when there is one.
        for key, value in (("loss", loss), ("logits", logits), ("aux_loss", aux_loss)):
            if value is not None:
                self[key] = value

    def __getattr__(self, name: str):
        if name in ("loss", "logits", "aux_loss"):
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return tuple(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against labels (B, T), -100 ignored.

    real_vocab_size: ids at or past it are padded rows of the LM head, never a target; a label there
    is a data bug (a tokenizer bigger than the model), so it is refused rather than scored at ~1e30."""
    if labels.shape != logits.shape[:2]:
        raise LmstackError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, "
                           f"got {tuple(labels.shape)}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    scored = shifted[shifted != IGNORE_INDEX]
    limit = logits.shape[-1] if real_vocab_size is None else min(real_vocab_size, logits.shape[-1])
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= limit):
        bad = scored[(scored < 0) | (scored >= limit)][0].item()
        raise LmstackError(f"label id {bad} is outside the model's vocabulary of {limit} tokens "
                           f"(use {IGNORE_INDEX} for positions without a target)")
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX)
