"""Merge adapters into the base weights, unmerge them again, or merge and drop the adapter layers.

Merging folds each adapter's update into the base weight (LoRA: W + s B A; DoRA: m * (W + s B A) / norm),
so inference costs nothing extra; unmerging subtracts it again (DoRA divides by the norm cached at merge
time). Safe merge computes every merged weight first and refuses, changing nothing, if any holds a NaN
or inf. merge_and_unload returns a plain model: each AdapterLinear is replaced by an nn.Linear holding the
merged weight (a quantized base is dequantized: the result is exact, not re-rounded).

Usage:
    merge_adapter(model)                      # all active adapters
    merge_adapter(model, ["math"], safe_merge=True)
    unmerge_adapter(model)
    model = merge_and_unload(model)           # an ordinary Transformer again
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.layers import KINDS, AdapterLinear
from lmstack.adapt.lora import adapter_layers
from lmstack.compress.quant_storage import QuantizedLinear
from lmstack.errors import LmstackError


def _names(layer: AdapterLinear, adapter_names: list[str] | None) -> list[str]:
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [n for n in names if n in layer.kind and n not in layer.merged_adapters]


def _check_known(model: nn.Module, adapter_names: list[str] | None) -> dict[str, AdapterLinear]:
    layers = adapter_layers(model)
    if not layers:
        raise LmstackError("the model has no LoRA-family adapter layers to merge")
    if adapter_names is not None:
        known = {n for layer in layers.values() for n in layer.kind}
        missing = [n for n in adapter_names if n not in known]
        if missing:
            raise LmstackError(f"adapter(s) {missing} are not on the model; it has {sorted(known)}")
    return layers


def _merged_weight(layer: AdapterLinear, names: list[str]) -> torch.Tensor:
    w = layer.base_weight().detach().clone()
    cache = dict(layer._cache)
    for name in names:
        w = KINDS[layer.kind[name]].merge(layer, name, w)
    layer._cache = cache  # a dry run must not leave merge-time state behind
    return w


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Fold the given (default: active) adapters into the base weights, in place."""
    layers = _check_known(model, adapter_names)
    if safe_merge:
        for module_name, layer in layers.items():
            names = _names(layer, adapter_names)
            if names and not torch.isfinite(_merged_weight(layer, names)).all():
                raise LmstackError(f"safe merge refused: merging {names} into {module_name} gives NaN/inf weights; "
                                   "the adapter is broken (nothing was changed)")
    for layer in layers.values():
        for name in _names(layer, adapter_names):
            layer.merge(name)
    return model


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first), in place."""
    for layer in _check_known(model, None).values():
        for name in reversed(list(layer.merged_adapters)):
            layer.unmerge(name)
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module, safe_merge: bool = False, merge: bool = True) -> nn.Module:
    """Replace every AdapterLinear by a plain nn.Linear with the active adapters merged in (merge=False: the
    base weight alone, i.e. drop the adapters), and every remaining QuantizedLinear by its dequantized
    nn.Linear, so the result is an ordinary model that save_model can write. model.adapter_configs loses
    its LoRA-family entries."""
    layers = _check_known(model, None)
    was_merged = {n: list(layer.merged_adapters) for n, layer in layers.items()}
    weights: dict[str, torch.Tensor] = {}
    # Work from the unmerged base, so merged and unmerged adapters are treated alike; if the safe check
    # fails, re-merge what was merged, so the model is as it was.
    for module_name, layer in layers.items():
        for name in reversed(was_merged[module_name]):
            layer.unmerge(name)
        names = list(layer.active_adapters) if merge and not layer.disabled else []
        weights[module_name] = _merged_weight(layer, names)
        if safe_merge and not torch.isfinite(weights[module_name]).all():
            for done, done_layer in layers.items():
                if done in weights:
                    for name in was_merged[done]:
                        done_layer.merge(name)
            raise LmstackError(f"safe merge refused: merging {names} into {module_name} gives NaN/inf weights "
                               "(nothing was changed)")
    for module_name, layer in layers.items():
        _replace(model, module_name, _linear(weights[module_name], layer.base_layer.bias))
    for module_name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            _replace(model, module_name, _linear(module.dequantize(), module.bias))
    if hasattr(model, "adapter_configs"):
        model.adapter_configs = {k: v for k, v in model.adapter_configs.items()
                                 if v.method not in ("lora", "dora", "qlora")}
        model.active_adapters = [n for n in getattr(model, "active_adapters", []) if n in model.adapter_configs]
    return model


def _linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    linear.weight.copy_(w)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _replace(model: nn.Module, module_name: str, module: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
