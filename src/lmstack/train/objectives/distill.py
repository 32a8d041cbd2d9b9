"""Knowledge distillation in pretraining (Hinton et al. 2015): match a teacher's softened distribution.

The student and the teacher read the same batch (built by distill_base: clm, prefix_lm or mlm). At
every counted position:

    loss = alpha * CE(student, target) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

T > 1 softens both distributions so the student also learns the teacher's ranking of wrong answers
("dark knowledge"); the T^2 factor keeps that term's gradient on the same scale as CE's when T
changes. The teacher runs under no_grad in eval mode and is never trained; it must share the
student's vocabulary. It is loaded from objective.teacher with lmstack.load_model, or passed in.

Usage:
    obj = Distill(ObjectiveConfig(name="distill", teacher="runs/big/model"), student_cfg)
    obj = Distill(ObjectiveConfig(name="distill"), student_cfg, teacher=teacher_model)
    loss, metrics = obj.loss(student, obj.prepare(tokens, g))   # metrics: ce, kl, ...
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.train.objectives.base import Objective, model_inputs, scored_logits
from lmstack.train.objectives.clm import CausalLM
from lmstack.train.objectives.mlm import MaskedLM
from lmstack.train.objectives.prefix_lm import PrefixLM

BASES = {"clm": CausalLM, "prefix_lm": PrefixLM, "mlm": MaskedLM}


def distill_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token CE of the student, per-token T^2 * KL(teacher_T || student_T)) for (N, V) logits."""
    ce = F.cross_entropy(student.float(), targets, reduction="none")
    log_p_s = F.log_softmax(student.float() / temperature, -1)
    log_p_t = F.log_softmax(teacher.float() / temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return ce, temperature**2 * kl


class Distill(Objective):
    name = "distill"
    attention = "any"

    def __init__(self, cfg, model_cfg, pad_id: int | None = None, teacher: nn.Module | None = None):
        super().__init__(cfg, model_cfg, pad_id)
        self.base = BASES[cfg.distill_base](cfg, model_cfg, pad_id)
        self.prefix_safe, self.reserved = self.base.prefix_safe, self.base.reserved
        self.min_len = self.base.min_len
        if teacher is None:
            if not cfg.teacher:
                raise ConfigError("objective.teacher must name a model directory when name='distill'")

            teacher = load_model(cfg.teacher)
        t_cfg = getattr(teacher, "config", None)
        if t_cfg is not None and t_cfg.vocab_size != model_cfg.vocab_size:
            raise LmstackError(f"teacher vocab_size={t_cfg.vocab_size} differs from the student's "
                               f"{model_cfg.vocab_size}; distillation needs the same vocabulary")
        if t_cfg is not None and t_cfg.causal != model_cfg.causal:
            raise LmstackError(f"teacher causal={t_cfg.causal} differs from the student's causal={model_cfg.causal}")
        self.teacher = teacher.eval().requires_grad_(False)

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.base._prepare(tokens, generator, doc_ids)

    def to(self, device) -> "Distill":
        super().to(device)
        self.teacher.to(device)
        return self

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        kw, mask = model_inputs(batch), batch["loss_mask"]
        s = scored_logits(model, batch["input_ids"], mask, kw)
        p = next(iter(self.teacher.parameters()), None)
        if p is not None and p.device != s.device:
            self.teacher.to(s.device)
        self.teacher.eval()
        with torch.no_grad():
            t = scored_logits(self.teacher, batch["input_ids"], mask, kw)
        y = batch["targets"][mask]
        n = y.numel()
        if n == 0:
            return self.finish(model, s.sum() * 0.0, {"ce": 0.0, "kl": 0.0, "accuracy": 0.0, "n_tokens": 0})
        ce, kl = distill_terms(s, t, y, self.cfg.distill_temperature)
        self._place(s)
        w = self.weighting.weights(y, ce.detach()) if model.training else None
        ce_term = ce.mean() if w is None else (w * ce).mean()
        alpha = self.cfg.distill_alpha
        loss = alpha * ce_term + (1 - alpha) * kl.mean()
        metrics = {"ce": float(ce.detach().mean()), "kl": float(kl.detach().mean()) / self.cfg.distill_temperature**2,
                   "accuracy": float((s.detach().argmax(-1) == y).float().mean()),
                   "teacher_ce": float(F.cross_entropy(t.float(), y)), "n_tokens": n}
        return self.finish(model, loss, metrics)
