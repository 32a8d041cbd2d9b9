"""Pretraining objectives: what the model is asked to predict, from which inputs, and how it is scored.

Each objective is a small class with prepare(tokens, generator) -> batch and loss(model, batch) ->
(loss, metrics); OBJECTIVES maps ObjectiveConfig.name to it. Two add-ons apply on top of any objective:
token re-weighting (token_weighting) inside the cross-entropy, and the contrastive InfoNCE loss
(contrastive_weight > 0), which wraps the objective.

    clm        causal LM: next-token prediction                              (clm.py)
    mlm        masked LM, BERT's 80/10/10, bidirectional encoder             (mlm.py)
    span       T5 span corruption with sentinels, decoder-only framing       (span.py)
    prefix_lm  bidirectional prefix, causal scored suffix                    (prefix_lm.py)
    electra    replaced-token detection: small generator + discriminator     (electra.py)
    ul2        mixture of denoisers R / S / X                                (ul2.py)
    distill    CE mixed with temperature-scaled KL to a teacher              (distill.py)

Usage:
    from lmstack.train.objectives import ObjectiveConfig, build_objective, OBJECTIVES
    obj = build_objective(ObjectiveConfig(name="span"), model.config, pad_id=tok.pad_id)
    opt = torch.optim.AdamW(list(model.parameters()) + obj.parameters(), lr=1e-3)
    batch = obj.prepare(tokens, generator)        # tokens: (B, T+1) from the loader
    loss, metrics = obj.loss(model, batch)
    loss.backward(); opt.step()
"""
from __future__ import annotations

from lmstack.train.objectives.base import Objective
from lmstack.train.objectives.clm import CausalLM
from lmstack.train.objectives.config import ObjectiveConfig
from lmstack.train.objectives.contrastive import Contrastive, info_nce
from lmstack.train.objectives.distill import Distill
from lmstack.train.objectives.electra import Electra
from lmstack.train.objectives.mlm import MaskedLM
from lmstack.train.objectives.prefix_lm import PrefixLM
from lmstack.train.objectives.span import SpanCorruption
from lmstack.train.objectives.token_weighting import WEIGHTINGS
from lmstack.train.objectives.ul2 import UL2

OBJECTIVES: dict[str, type[Objective]] = {
    "clm": CausalLM,
    "mlm": MaskedLM,
    "span": SpanCorruption,
    "prefix_lm": PrefixLM,
    "electra": Electra,
    "ul2": UL2,
    "distill": Distill,
}


def build_objective(cfg: ObjectiveConfig, model_cfg, pad_id: int | None = None):
    """The objective cfg.name for a model with `model_cfg`, wrapped with the contrastive loss when asked."""
    objective = OBJECTIVES[cfg.name](cfg, model_cfg, pad_id)
    if cfg.contrastive_weight > 0:
        objective = Contrastive(objective, cfg, model_cfg)
    return objective


__all__ = ["OBJECTIVES", "WEIGHTINGS", "CausalLM", "Contrastive", "Distill", "Electra", "MaskedLM", "Objective",
           "ObjectiveConfig", "PrefixLM", "SpanCorruption", "UL2", "build_objective", "info_nce"]
