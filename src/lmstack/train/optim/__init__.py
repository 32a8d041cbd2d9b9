"""Optimizers, parameter groups and learning-rate schedules, chosen by name from small registries.

OPTIMIZERS maps OptimizerConfig.name to a builder (param groups, cfg) -> torch.optim.Optimizer:
adamw (torch's AdamW, fused/foreach where available), lamb, adafactor, shampoo, soap, lion, and muon
(Muon for the blocks' matrices + AdamW for the rest, one optimizer object). build_optimizer makes
the param groups first (no weight decay for norms, biases and embeddings; layer-wise LR decay; see
param_groups.py), so every optimizer gets the same groups. Every group carries "base_lr", its LR
before any schedule; the trainer sets group["lr"] = group["base_lr"] * lr_multiplier(...) each step.

Usage:
    from lmstack.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.02))
    sched = ScheduleConfig(name="wsd", warmup_steps=50)
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(sched, step, total)
        loss(model).backward(); opt.step(); opt.zero_grad(set_to_none=True)
"""
from __future__ import annotations

from typing import Callable

import torch

from lmstack.train.optim.adafactor import Adafactor
from lmstack.train.optim.config import OptimizerConfig
from lmstack.train.optim.lamb import Lamb
from lmstack.train.optim.lion import Lion
from lmstack.train.optim.muon import Muon, orthogonalize
from lmstack.train.optim.param_groups import classify, group_of, param_groups
from lmstack.train.optim.schedules import SCHEDULES, ScheduleConfig, lr_multiplier
from lmstack.train.optim.shampoo import Shampoo
from lmstack.train.optim.soap import SOAP


def _fused_available(groups: list[dict]) -> bool:
    """torch's fused AdamW kernel takes plain (non-DTensor) float tensors on CPU or CUDA."""
    params = [p for g in groups for p in g["params"]]
    return all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in params)


def _adamw(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # None: the fused kernel where it is available (one kernel over all tensors; 2x faster steps on CPU
    # than torch's default for-loop, see benchmarks/optimizers.py), else torch's own default
    fused = _fused_available(groups) if cfg.fused is None else cfg.fused
    kwargs = {"fused": True} if fused else {"foreach": True} if cfg.fused is False else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             **kwargs)


def _lamb(groups, cfg):
    return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                max_trust_ratio=cfg.lamb_max_trust_ratio)


def _adafactor(groups, cfg):
    return Adafactor(groups, lr=cfg.lr, beta1=cfg.adafactor_beta1, decay_rate=cfg.adafactor_decay_rate,
                     clip_threshold=cfg.adafactor_clip_threshold, weight_decay=cfg.weight_decay,
                     relative_step=cfg.adafactor_relative_step, scale_parameter=cfg.adafactor_scale_parameter)


def _shampoo(groups, cfg):
    return Shampoo(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                   shampoo_beta=cfg.shampoo_beta, precondition_frequency=cfg.precondition_frequency,
                   max_precond_dim=cfg.max_precond_dim, damping=cfg.precond_damping)


def _soap(groups, cfg):
    return SOAP(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                shampoo_beta=cfg.shampoo_beta, precondition_frequency=cfg.precondition_frequency,
                max_precond_dim=cfg.max_precond_dim)


def _lion(groups, cfg):
    return Lion(groups, lr=cfg.lr, betas=cfg.lion_betas, weight_decay=cfg.weight_decay)


def _muon(groups, cfg):
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw, "lamb": _lamb, "adafactor": _adafactor, "shampoo": _shampoo, "soap": _soap,
    "lion": _lion, "muon": _muon,
}


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer cfg.name over model's trainable parameters, with param groups from param_groups()."""
    groups = param_groups(model, cfg, lr=cfg.lr, muon_lr=cfg.muon_lr if cfg.name == "muon" else None)
    return OPTIMIZERS[cfg.name](groups, cfg)


__all__ = [
    "OPTIMIZERS", "SCHEDULES", "Adafactor", "Lamb", "Lion", "Muon", "OptimizerConfig", "SOAP", "ScheduleConfig",
    "Shampoo", "build_optimizer", "classify", "group_of", "lr_multiplier", "orthogonalize", "param_groups",
]
