"""Causal language modelling: predict every next token (GPT).

The loader's rows hold T+1 tokens; the model reads tokens[:, :-1] and position i is scored on
tokens[:, i + 1]. Every position counts except targets equal to the pad id. Document ids, when the
loader provides them, go to the model so attention never crosses a document boundary.

Usage:
    obj = CausalLM(ObjectiveConfig(name="clm"), model_cfg)
    batch = obj.prepare(tokens, generator)        # input_ids, targets, loss_mask (+ doc_ids)
    loss, metrics = obj.loss(model, batch)
"""
from __future__ import annotations

import torch

from lmstack.train.objectives.base import Objective


class CausalLM(Objective):
    name = "clm"
    attention = "causal"

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
                 "loss_mask": torch.ones_like(tokens[:, 1:], dtype=torch.bool)}
        if doc_ids is not None:
            batch["doc_ids"] = doc_ids
        return batch
