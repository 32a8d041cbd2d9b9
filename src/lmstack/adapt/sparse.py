"""Sparse fine-tuning: train only chosen layers or chosen MoE experts, and freeze early layers adaptively.

- layers_to_train=[...]: every parameter of those blocks trains, nothing else (None = all blocks).
- freeze_first_n=N: blocks 0..N-1 stay frozen (applied on top of layers_to_train).
- experts_to_train=[...]: inside the chosen blocks' MoE layers only those experts train; attention,
  router and the other experts stay frozen. The experts are stored stacked, (E, ...), and
  requires_grad is per tensor, so each stacked weight gets a parametrization that adds a trainable
  delta for the chosen experts only (zero at the start): the trainable count is exactly theirs, and
  weight decay cannot touch the frozen experts. merge_sparse folds the deltas back in.

Adaptive freezing (FreezeOut, Brock et al. 2017; AutoFreeze): early layers settle first, so freezing
them as training goes on saves their backward pass. FreezeSchedule says how many leading blocks are
frozen at each step (a linear ramp); LayerFreezer applies it. Once the embeddings and the first n
blocks are frozen, autograd stops below block n, so a step gets cheaper.

Usage:
    model = get_peft_model(model, AdapterConfig(method="sparse", layers_to_train=[2, 3]))
    model = get_peft_model(moe_model, AdapterConfig(method="sparse", experts_to_train=[0, 5]))
    freezer = LayerFreezer(model, FreezeSchedule(total_steps=1000, max_frozen=4))
    for step in range(1000):
        freezer.step(step)            # freezes block 0 at step 200, block 1 at 400, ...
        ...
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError
from lmstack.model.moe import MoE


class ExpertDelta(nn.Module):
    """Parametrization W -> W + delta on the rows of chosen experts (W stacked as (E, ...))."""

    def __init__(self, shape: torch.Size, experts: list[int], ref: torch.Tensor):
        super().__init__()
        self.register_buffer("experts", torch.tensor(experts, dtype=torch.long, device=ref.device))
        self.delta = nn.Parameter(torch.zeros(len(experts), *shape[1:], device=ref.device, dtype=ref.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.index_add(0, self.experts, self.delta)


def chosen_blocks(n_blocks: int, cfg) -> list[int]:
    """Indices of the blocks sparse fine-tuning trains, checked against the model."""
    layers = list(range(n_blocks)) if cfg.layers_to_train is None else sorted(set(cfg.layers_to_train))
    bad = [i for i in layers if i >= n_blocks]
    if bad:
        raise LmstackError(f"layers_to_train={cfg.layers_to_train} names block(s) {bad}, but the model has "
                           f"{n_blocks} blocks (0..{n_blocks - 1})")
    if cfg.freeze_first_n > n_blocks:
        raise LmstackError(f"freeze_first_n={cfg.freeze_first_n} is more than the model's {n_blocks} blocks")
    layers = [i for i in layers if i >= cfg.freeze_first_n]
    if not layers:
        raise LmstackError(f"sparse fine-tuning would train nothing: layers_to_train={cfg.layers_to_train}, "
                           f"freeze_first_n={cfg.freeze_first_n}")
    return layers


@register_method("sparse")
def add_sparse(model: nn.Module, cfg, adapter_name: str) -> None:
    """Unfreeze the chosen blocks, or add trainable deltas for the chosen experts of their MoE layers."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmstackError("sparse fine-tuning needs an lmstack Transformer (with .blocks)")
    layers = chosen_blocks(len(blocks), cfg)
    if cfg.experts_to_train is None:
        for i in layers:
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        return
    moes = [blocks[i].mlp for i in layers if isinstance(blocks[i].mlp, MoE)]
    if not moes:
        raise LmstackError(f"experts_to_train={cfg.experts_to_train} but blocks {layers} have no MoE layer")
    experts = sorted(set(cfg.experts_to_train))
    for moe in moes:
        bad = [e for e in experts if e >= moe.n_experts]
        if bad:
            raise LmstackError(f"experts_to_train={cfg.experts_to_train} names expert(s) {bad}, but the MoE layers "
                               f"have {moe.n_experts} experts (0..{moe.n_experts - 1})")
        for name in ("w_in", "w_out"):
            w = getattr(moe, name)
            w.requires_grad_(False)
            parametrize.register_parametrization(moe, name, ExpertDelta(w.shape, experts, w))


def merge_sparse(model: nn.Module) -> None:
    """Fold expert deltas into the stacked expert weights; the model's state dict gets its plain names back."""
    for module in model.modules():
        if isinstance(module, MoE) and parametrize.is_parametrized(module):
            for name in ("w_in", "w_out"):
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                    getattr(module, name).requires_grad_(False)


# ---- adaptive layer freezing
@dataclass
class FreezeSchedule:
    total_steps: int
    """Length of training in steps."""
    max_frozen: int
    """How many leading blocks are frozen by the end."""
    start_frac: float = 0.2
    """Fraction of training before the first block freezes."""
    end_frac: float = 0.8
    """Fraction of training by which all max_frozen blocks are frozen."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise LmstackError(f"total_steps={self.total_steps} is not allowed; it must be >= 1")
        if self.max_frozen < 0:
            raise LmstackError(f"max_frozen={self.max_frozen} is not allowed; it must be >= 0")
        if not 0 <= self.start_frac <= self.end_frac <= 1:
            raise LmstackError(f"start_frac={self.start_frac}, end_frac={self.end_frac} are not allowed; "
                               "they need 0 <= start_frac <= end_frac <= 1")

    def n_frozen(self, step: int) -> int:
        """Leading blocks frozen at `step`: 0 before start_frac, then one more every equal share, up to max_frozen."""
        start, end = self.start_frac * self.total_steps, self.end_frac * self.total_steps
        if step < start or self.max_frozen == 0:
            return 0
        if step >= end or end == start:
            return self.max_frozen
        return min(self.max_frozen, 1 + int((step - start) / (end - start) * self.max_frozen))


def freeze_layers(model: nn.Module, n: int) -> list[nn.Parameter]:
    """Freeze the input embeddings and blocks 0..n-1 (their grads dropped); returns the parameters frozen now.

    Tied input/output embeddings are left alone: freezing them would also freeze the LM head."""
    if n <= 0:
        return []
    if n > len(model.blocks):
        raise LmstackError(f"cannot freeze {n} blocks; the model has {len(model.blocks)}")
    modules = [model.blocks[i] for i in range(n)]
    if model.lm_head is not None:
        modules.append(model.tok_emb)
    if isinstance(getattr(model, "pos_emb", None), nn.Embedding):
        modules.append(model.pos_emb)
    frozen = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                p.grad = None  # optimizers skip parameters without a gradient
                frozen.append(p)
    return frozen


class LayerFreezer:
    """Applies a FreezeSchedule to a model during training: call step(step) before each forward."""

    def __init__(self, model: nn.Module, schedule: FreezeSchedule):
        if schedule.max_frozen > len(model.blocks):
            raise LmstackError(f"max_frozen={schedule.max_frozen} is more than the model's {len(model.blocks)} blocks")
        self.model, self.schedule, self.n_frozen = model, schedule, 0

    def step(self, step: int) -> int:
        n = self.schedule.n_frozen(step)
        if n > self.n_frozen:
            freeze_layers(self.model, n)
            self.n_frozen = n
        return self.n_frozen
