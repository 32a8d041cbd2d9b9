"""Several named adapters on one base: switch, disable, delete, and combine them with weights.

Every LoRA-family adapter lives in the same AdapterLinear layers under its own name, so these are
cheap bookkeeping operations. `model.active_adapters` records the current choice for other methods.

add_weighted_adapter builds a new LoRA adapter whose update is exactly sum_i w_i * s_i * B_i A_i:
- "cat" (default): stack the A's and the weighted B's; the new rank is the sum of the ranks. Exact, no SVD.
- "svd": form the combined update and keep its best rank-r approximation (r = the largest input rank).
  Smaller, exact only when the combined update has rank <= r.

Usage:
    add_adapter(model, cfg, "math"); add_adapter(model, cfg, "code")
    set_adapter(model, "code")                 # only "code" acts
    with disable_adapters(model):              # the base model alone
        base_logits = model(idx)
    add_weighted_adapter(model, ["math", "code"], [0.7, 0.3], "blend")
    delete_adapter(model, "math")
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmstack.adapt.config import AdapterConfig
from lmstack.adapt.lora import adapter_layers
from lmstack.errors import LmstackError


def _known(model: nn.Module) -> set[str]:
    # LoRA-family names live in the AdapterLinear layers; hook-based methods (adapters, fusion, IA3, ...) are
    # known by their configs on the model.
    return {n for layer in adapter_layers(model).values() for n in layer.kind} | set(getattr(model, "adapter_configs", {}))


def _require(model: nn.Module, names: list[str]) -> None:
    known = _known(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise LmstackError(f"adapter(s) {missing} are not on the model; it has {sorted(known) or 'none'}")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` (one name or several, which then add up) the active adapters of every layer."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for layer in adapter_layers(model).values():
        if layer.merged_adapters:
            raise LmstackError(f"adapters {layer.merged_adapters} are merged; unmerge before switching adapters")
        layer.active_adapters = [n for n in names if n in layer.kind]
    model.active_adapters = names


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model runs as its base (no adapter acts); the previous state comes back after."""
    layers = list(adapter_layers(model).values())
    merged = [layer.merged_adapters for layer in layers if layer.merged_adapters]
    if merged:
        raise LmstackError(f"adapters {merged[0]} are merged into the base weights, so they cannot be "
                           "disabled; unmerge first")
    before = [layer.disabled for layer in layers]
    flag = getattr(model, "adapters_disabled", False)
    for layer in layers:
        layer.disabled = True
    model.adapters_disabled = True  # for methods that do not live in AdapterLinear layers
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was
        model.adapters_disabled = flag


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its weights from every layer."""
    _require(model, [name])
    for layer in adapter_layers(model).values():
        if name in layer.kind:
            layer.delete(name)
    getattr(model, "adapter_configs", {}).pop(name, None)
    if name in getattr(model, "active_adapters", []):
        model.active_adapters = [n for n in model.active_adapters if n != name]


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination: str = "cat") -> None:
    """A new LoRA adapter `adapter_name` whose update is sum_i weights[i] * update(adapters[i])."""
    if combination not in ("cat", "svd"):
        raise LmstackError(f"combination={combination!r} is not allowed; choose 'cat' or 'svd'")
    if not adapters or len(adapters) != len(weights):
        raise LmstackError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    _require(model, adapters)
    if adapter_name in _known(model):
        raise LmstackError(f"the model already has an adapter named {adapter_name!r}")
    layers = {n: layer for n, layer in adapter_layers(model).items() if any(a in layer.kind for a in adapters)}
    for module_name, layer in layers.items():
        kinds = {layer.kind[a] for a in adapters if a in layer.kind}
        if kinds != {"lora"}:
            raise LmstackError(f"only plain LoRA adapters can be combined; {module_name} has kinds {sorted(kinds)}")
    max_r = max(layer.lora_A[a].weight.shape[0] for layer in layers.values() for a in adapters if a in layer.kind)
    targets = []
    for module_name, layer in layers.items():
        parts = [(w, a) for a, w in zip(adapters, weights) if a in layer.kind]
        # Fold each weight and scale into B, so the new adapter has scale 1: delta = [w s B_1 | ...] @ [A_1; ...].
        a_cat = torch.cat([layer.lora_A[a].weight for _, a in parts], dim=0)
        b_cat = torch.cat([w * layer.scaling[a] * layer.lora_B[a].weight for w, a in parts], dim=1)
        if combination == "svd":
            u, s, vh = torch.linalg.svd(b_cat @ a_cat, full_matrices=False)
            r = min(max_r, s.numel())
            b_cat, a_cat = u[:, :r] * s[:r], vh[:r]
        layer.add_lora(adapter_name, r=a_cat.shape[0], scale=1.0)
        layer.lora_A[adapter_name].weight.copy_(a_cat)
        layer.lora_B[adapter_name].weight.copy_(b_cat)
        # add_lora made it active; keep the active set as it was, so combining does not change the model.
        layer.active_adapters.remove(adapter_name)
        targets.append(module_name)
    ranks = {layer.lora_A[adapter_name].weight.shape[0] for layer in layers.values()}
    configs = getattr(model, "adapter_configs", None)
    if configs is None:
        configs = model.adapter_configs = {}
    # scale 1 for every layer: alpha == r == rank (ranks agree across layers unless adapters cover different ones)
    r = max(ranks)
    configs[adapter_name] = AdapterConfig(method="lora", r=r, alpha=float(r), target_modules=targets)
