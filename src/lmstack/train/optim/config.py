"""OptimizerConfig: which optimizer, its learning rate and the knobs of each optimizer family.

Fields shared by every optimizer come first; fields that only one family reads carry its name as a
prefix (lamb_, adafactor_, lion_) or are listed under it (Muon, Shampoo/SOAP). Invalid values raise
ConfigError (a ValueError) naming the field.

Usage:
    from lmstack.train.optim import OptimizerConfig, build_optimizer
    cfg = OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.02, layer_lr_decay=0.9)
    optimizer = build_optimizer(model, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmstack.runtime.validation import check_choices, check_range, need

OptimizerName = Literal["adamw", "lamb", "adafactor", "shampoo", "soap", "lion", "muon"]


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adamw"
    """Optimizer: adamw (torch's), lamb, adafactor, shampoo, soap, lion, or muon (Muon for block matrices + AdamW)."""
    lr: float = 3e-4
    """Peak learning rate (for muon: the rate of the AdamW part; see muon_lr). The schedule multiplies it."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam-style moment decays (adamw, lamb, soap, shampoo's grafting, muon's AdamW part)."""
    eps: float = 1e-8
    """Added to the second-moment root in the denominator (adamw, lamb, soap, shampoo)."""
    weight_decay: float = 0.1
    """Decoupled weight decay: each step multiplies decayed weights by (1 - lr * weight_decay)."""
    no_decay_norms_biases_embeddings: bool = True
    """Put norm weights, biases, embeddings and all other <2-D tensors into groups with weight_decay=0."""
    layer_lr_decay: float = 1.0
    """Layer-wise LR decay: block i gets lr * decay**(n_blocks-1-i), embeddings decay**n_blocks, head 1.0."""
    fused: bool | None = None
    """AdamW only: True = fused kernel, False = foreach (multi-tensor) kernel, None = fused where available."""
    # ---- LAMB
    lamb_max_trust_ratio: float = 10.0
    """LAMB: upper clip of the per-tensor trust ratio ||w|| / ||update|| (0 = no clip)."""
    # ---- Adafactor
    adafactor_beta1: float = 0.0
    """Adafactor: first-moment decay; 0 keeps no first moment, so a matrix's state stays O(rows + cols)."""
    adafactor_decay_rate: float = 0.8
    """Adafactor: second-moment decay grows as beta2_t = 1 - t**(-decay_rate)."""
    adafactor_clip_threshold: float = 1.0
    """Adafactor: the update is divided by max(1, RMS(update) / clip_threshold)."""
    adafactor_relative_step: bool = False
    """Adafactor: step size min(lr, 1/sqrt(t)) (the paper's relative step with lr as its cap) instead of lr."""
    adafactor_scale_parameter: bool = False
    """Adafactor: multiply the step size by max(1e-3, RMS(parameter)), so updates are relative to weight scale."""
    # ---- Shampoo / SOAP
    precondition_frequency: int = 10
    """Shampoo/SOAP: steps between recomputing the Kronecker factors' eigendecompositions."""
    max_precond_dim: int = 1024
    """Shampoo/SOAP: dimensions longer than this get no preconditioner (Adam along that side)."""
    shampoo_beta: float = 0.95
    """Shampoo/SOAP: EMA decay of the Kronecker factors L = E[G G^T], R = E[G^T G]."""
    precond_damping: float = 1e-6
    """Shampoo/SOAP: damping added to a factor's eigenvalues, relative to its largest eigenvalue."""
    # ---- Lion
    lion_betas: tuple[float, float] = (0.9, 0.99)
    """Lion: (interpolation beta for the sign, momentum decay)."""
    # ---- Muon
    muon_lr: float = 0.02
    """Muon: learning rate of the orthogonalised updates of block matrices (the rest use lr)."""
    momentum: float = 0.95
    """Muon: momentum of the matrix updates."""
    nesterov: bool = True
    """Muon: Nesterov momentum (orthogonalise g + momentum * (buffer - g))."""
    ns_steps: int = 5
    """Muon: Newton-Schulz iterations of the quintic orthogonalisation."""
    muon_weight_decay: float = 0.0
    """Muon: decoupled weight decay of the Muon matrices (modded-nanogpt uses 0)."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.betas, self.lion_betas = tuple(self.betas), tuple(self.lion_betas)
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        for name in ("betas", "lion_betas"):
            b = getattr(self, name)
            need(len(b) == 2 and all(0.0 <= x < 1.0 for x in b), f"{name} must be two numbers in [0, 1), got {b}")
        need(self.eps > 0, f"eps must be positive, got {self.eps}")
        check_range("weight_decay", self.weight_decay, low=0)
        need(self.layer_lr_decay > 0, f"layer_lr_decay must be > 0 (1.0 = off), got {self.layer_lr_decay}")
        check_range("lamb_max_trust_ratio", self.lamb_max_trust_ratio, low=0)
        need(0.0 <= self.adafactor_beta1 < 1.0, f"adafactor_beta1 must be in [0, 1), got {self.adafactor_beta1}")
        need(0.0 < self.adafactor_decay_rate <= 1.0,
             f"adafactor_decay_rate must be in (0, 1], got {self.adafactor_decay_rate}")
        need(self.adafactor_clip_threshold > 0,
             f"adafactor_clip_threshold must be positive, got {self.adafactor_clip_threshold}")
        need(self.precondition_frequency >= 1,
             f"precondition_frequency must be >= 1, got {self.precondition_frequency}")
        check_range("max_precond_dim", self.max_precond_dim, low=1)
        need(0.0 <= self.shampoo_beta < 1.0, f"shampoo_beta must be in [0, 1), got {self.shampoo_beta}")
        need(self.precond_damping > 0, f"precond_damping must be positive, got {self.precond_damping}")
        need(self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}")
        need(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        check_range("ns_steps", self.ns_steps, low=1)
        check_range("muon_weight_decay", self.muon_weight_decay, low=0)
