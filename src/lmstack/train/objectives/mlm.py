"""Masked language modelling with BERT's 80/10/10 rule (Devlin et al. 2019).

Of each row's eligible positions (not pad, not bos), round(mask_prob * n) are chosen (at least one
when any is eligible). Of the chosen ones, 80% become the mask id, 10% a random id and 10% keep
their token (mask_replace_prob / mask_random_prob); the model, a bidirectional encoder, must
recover the original token at every chosen position, and only there. Keeping and randomising some
positions stops the encoder from learning that only [MASK] positions matter, a habit that would not
transfer to unmasked text at fine-tuning time. The row uses the first T of the loader's T+1 tokens.

Usage:
    obj = MaskedLM(ObjectiveConfig(name="mlm"), ModelConfig(causal=False, ...))
    batch = obj.prepare(tokens, generator)    # input_ids (corrupted), targets (original), loss_mask (chosen)
"""
from __future__ import annotations

import torch

from lmstack.errors import LmstackError
from lmstack.train.objectives.base import Objective


def eligible_positions(tokens: torch.Tensor, pad_id: int | None, bos_id: int | None) -> torch.Tensor:
    ok = torch.ones_like(tokens, dtype=torch.bool)
    for special in (pad_id, bos_id):
        if special is not None:
            ok &= tokens != special
    return ok


def choose_positions(eligible: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly max(1, round(prob * n_b)) random eligible positions per row b (none if n_b = 0).

    A fixed count per row (as BERT's data pipeline does) rather than an independent coin per token keeps
    the number of scored tokens, and so the loss's noise, the same from batch to batch."""
    n = eligible.sum(1)
    k = torch.where(n > 0, torch.floor(n * prob + 0.5).clamp_min(1), torch.zeros_like(n)).long()  # round half up
    scores = torch.rand(eligible.shape, generator=generator)
    scores[~eligible] = 2.0  # ineligible positions sort last
    rank = scores.argsort(1).argsort(1)
    return (rank < k[:, None]) & eligible


class MaskedLM(Objective):
    name = "mlm"
    attention = "bidirectional"
    prefix_safe = False

    def __init__(self, cfg, model_cfg, pad_id: int | None = None):
        super().__init__(cfg, model_cfg, pad_id)
        if model_cfg.head == "none":
            raise LmstackError(f"objective {self.name!r} needs token logits; set model.head='mlm' or 'lm' "
                               "(got head='none')")
        self.reserved = [self.mask_id]

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        original = tokens[:, :-1]
        chosen = choose_positions(eligible_positions(original, self.pad_id, self.bos_id), self.cfg.mask_prob, generator)
        u = torch.rand(original.shape, generator=generator)
        # A random id from the whole vocabulary except the mask id itself (shift the ids above it up by one).
        random_ids = torch.randint(0, self.vocab_size - 1, original.shape, generator=generator)
        random_ids += (random_ids >= self.mask_id).long()
        to_mask = chosen & (u < self.cfg.mask_replace_prob)
        to_random = chosen & ~to_mask & (u < self.cfg.mask_replace_prob + self.cfg.mask_random_prob)
        input_ids = torch.where(to_mask, torch.full_like(original, self.mask_id), original)
        input_ids = torch.where(to_random, random_ids, input_ids)
        batch = {"input_ids": input_ids, "targets": original, "loss_mask": chosen}
        if doc_ids is not None:
            batch["doc_ids"] = doc_ids
        if self.pad_id is not None and bool((original == self.pad_id).any()):
            batch["attention_mask"] = original != self.pad_id  # an encoder would otherwise attend to padding
        return batch
