"""Prefix language modelling: a bidirectional prefix under a causal suffix (T5's PrefixLM, UL2's S-denoiser).

Each row gets its own split point p, uniform in [1, T - 1]. The model reads the T input tokens with
prefix_len = p: the first p attend to each other in both directions, the rest causally. Only the
suffix is scored, from position p - 1 (the last prefix token, which predicts the first suffix token)
onwards; earlier positions would see, through the bidirectional prefix, the very token they predict.
Document ids pass through; the model intersects them with the prefix rule.

Usage:
    obj = PrefixLM(ObjectiveConfig(name="prefix_lm"), model_cfg)
    batch = obj.prepare(tokens, generator)    # input_ids, targets, loss_mask, prefix_len, lengths
"""
from __future__ import annotations

import torch

from lmstack.train.objectives.base import Objective, pack_rows


def prefix_row(row: torch.Tensor, generator: torch.Generator,
               lead: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(lead + row, cut to the row's length; prefix length). The prefix holds the lead tokens (UL2's mode
    token) and at least one more; the split is uniform over the remaining inner positions."""
    lead = lead or []
    full = torch.cat((torch.tensor(lead, dtype=row.dtype), row[: row.shape[0] - len(lead)]))
    t, lo = full.shape[0] - 1, len(lead) + 1
    p = int(torch.randint(lo, max(t, lo + 1), (1,), generator=generator))
    return full, p


class PrefixLM(Objective):
    name = "prefix_lm"
    attention = "causal"
    min_len = 3

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch = pack_rows([prefix_row(r, generator) for r in tokens], tokens.shape[1] - 1, 0)
        if doc_ids is not None:
            batch["doc_ids"] = doc_ids
        return batch
