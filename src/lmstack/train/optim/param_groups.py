"""Parameter groups: which tensors get weight decay, which LR scale each gets, which ones Muon takes.

Rules (nanoGPT / BEiT / modded-nanogpt conventions):
- no weight decay for norm weights, biases, embeddings and every other tensor with fewer than 2 dims
  (decaying a norm's gain or a bias towards 0 has no regularising meaning; embedding rows of rare
  tokens would be shrunk by decay far more than they are ever updated);
- layer-wise LR decay (BEiT, ELECTRA): block i of n gets decay**(n-1-i), the embedding stage
  (embeddings and the embedding norm) decay**n, everything after the last block (final norm, head) 1.0.
  With cross-layer sharing (n_unique_layers) depth is counted in unique blocks: a shared block's
  gradient sums over all the layers that use it, so no single layer depth is right for it, and the
  ladder stays geometric over the parameters that exist;
- Muon's matrices: >=2-D tensors inside blocks that are not norms or MoE routers. 3-D MoE expert
  stacks qualify; Muon orthogonalises each expert's matrix separately.
- a compressive memory's compressor (model.cmem_compress) trains at ModelConfig.cmem_lr_scale of the LR and
  without decay: it starts as mean pooling and only its own reconstruction loss reaches it, so the model's LR
  (and decay toward zero) would carry it away from a good start faster than that loss can steer it.
- µP (ModelConfig.parametrization='mup'): hidden matrices train at lr * mup_base_width / d_model under Adam, with
  weight decay * d_model / mup_base_width so lr * decay stays put; embeddings, the readout and vector-like tensors
  keep lr (model/mup.py).

Frozen tensors (requires_grad=False) are left out. Parameter names are found with a regex, so the
prefixes of wrappers (DDP "module.", torch.compile "_orig_mod.") do not matter.

Usage:
    infos = classify(model)                             # one ParamInfo per trainable tensor
    groups = param_groups(model, cfg, lr=cfg.lr)         # [{"params", "names", "lr", "base_lr", "weight_decay"}]
    groups = param_groups(model, cfg, lr=cfg.lr, muon_lr=cfg.muon_lr)   # adds "use_muon" groups
"""
from __future__ import annotations

from dataclasses import dataclass
import re

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.mup import lr_scale as mup_lr_scale

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_COMPRESSOR = re.compile(r"(?:^|\.)cmem_compress\.")


@dataclass
class ParamInfo:
    name: str
    param: nn.Parameter
    decay: bool
    """Gets weight decay (a >=2-D weight that is not an embedding)."""
    layer: int | None
    """Block index, None outside blocks."""
    embedding: bool
    """Belongs to the embedding stage (nn.Embedding modules and their norm, outside blocks)."""
    matrix: bool
    """Muon takes it: a >=2-D weight inside a block, not a norm, not an embedding, not a router."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def classify(model: nn.Module) -> list[ParamInfo]:
    """One ParamInfo per trainable parameter, in model order; tied tensors appear once."""
    infos, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            m = _BLOCK.search(name)
            layer = int(m.group(1)) if m else None
            norm, emb = _is_norm(module), isinstance(module, nn.Embedding)
            # the embedding stage: embedding tables and the norm right after them (e.g. BERT's emb_norm)
            stage_emb = layer is None and (emb or ("emb" in mod_name.rsplit(".", 1)[-1] and norm))
            decay = p.dim() >= 2 and not emb and not norm and not _COMPRESSOR.search(name)
            matrix = layer is not None and p.dim() >= 2 and not emb and not norm and "router" not in name
            infos.append(ParamInfo(name, p, decay, layer, stage_emb, matrix))
    return infos


def layer_scales(infos: list[ParamInfo], decay: float) -> list[float]:
    """The LR multiplier of each parameter under layer-wise LR decay `decay` (1.0 = all ones)."""
    n = max((i.layer for i in infos if i.layer is not None), default=-1) + 1
    scales = []
    for info in infos:
        if info.layer is not None:
            scales.append(decay ** (n - 1 - info.layer))
        elif info.embedding:
            scales.append(decay**n)
        else:
            scales.append(1.0)
    return scales


def param_groups(model: nn.Module, cfg, lr: float, muon_lr: float | None = None) -> list[dict]:
    """Optimizer param groups for `model` under OptimizerConfig `cfg`.

    Tensors with the same (weight decay, LR scale, Muon or not) share a group. Each group has
    "params", "names", "weight_decay", "lr" and "base_lr" (= lr before any schedule); with muon_lr
    set, Muon's matrices get their own groups (use_muon=True, lr = muon_lr * scale,
    weight_decay = cfg.muon_weight_decay) and the rest have use_muon=False."""
    infos = classify(model)
    if not infos:
        raise LmstackError("the model has no trainable parameters (all have requires_grad=False)")
    groups: dict[tuple, dict] = {}
    config = next((m.config for m in model.modules() if isinstance(getattr(m, "config", None), ModelConfig)), None)
    for info, scale in zip(infos, layer_scales(infos, cfg.layer_lr_decay)):
        if config is not None and config.memory == "compressive" and _COMPRESSOR.search(info.name):
            scale *= config.cmem_lr_scale
        mup = mup_lr_scale(config, info.name, info.param.dim())  # µP: hidden matrices at lr/m (model/mup.py)
        scale *= mup
        decay = info.decay or not cfg.no_decay_norms_biases_embeddings
        muon = muon_lr is not None and info.matrix
        key = (decay, scale, muon, mup)
        if key not in groups:
            if muon:
                group = {"lr": muon_lr * scale, "weight_decay": cfg.muon_weight_decay, "use_muon": True}
            else:
                # µP: decay times m, so the decoupled decay per step (lr * wd) stays width-independent (mup's MuAdam)
                group = {"lr": lr * scale, "weight_decay": cfg.weight_decay / mup if decay else 0.0}
                if muon_lr is not None:
                    group["use_muon"] = False
            group.update(params=[], names=[], base_lr=group["lr"], lr_scale=scale)
            groups[key] = group
        groups[key]["params"].append(info.param)
        groups[key]["names"].append(info.name)
    return list(groups.values())


def group_of(optimizer: torch.optim.Optimizer, name: str) -> dict:
    """The param group holding parameter `name` (by the "names" key param_groups() wrote)."""
    for group in optimizer.param_groups:
        if name in group.get("names", ()):
            return group
    raise KeyError(f"no param group holds {name!r}")
