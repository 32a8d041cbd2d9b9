"""LoRA (Hu et al. 2021): train a low-rank update B A beside frozen Linears; rsLoRA scaling optional.

Each target Linear is replaced in place by an AdapterLinear that keeps the original as `base_layer`
and adds `lora_A[name]` (r x in, kaiming-uniform) and `lora_B[name]` (out x r, zeros). The update is
scaled by alpha / r, or alpha / sqrt(r) with use_rslora (Kalajdzievski 2023: keeps the update's size
steady as r grows, so larger ranks actually help).

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    # model.blocks[0].attn.q_proj is now an AdapterLinear; only lora_A / lora_B train
"""
from __future__ import annotations

from torch import nn

from lmstack.adapt.layers import AdapterLinear
from lmstack.adapt.registry import find_targets, register_method
from lmstack.compress.quant_storage import QuantizedLinear


def wrap_linear(model: nn.Module, name: str) -> AdapterLinear:
    """The AdapterLinear at `name`, wrapping the plain layer there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterLinear):
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapped = AdapterLinear(module)
    setattr(parent, child, wrapped)
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Module name -> AdapterLinear for every wrapped layer of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def add_lora_layers(model: nn.Module, cfg, adapter_name: str, kind: str = "lora") -> list[str]:
    """Wrap every target of cfg.target_modules and add a `kind` adapter to it; returns the target names."""
    # Wrapped layers are AdapterLinear, not nn.Linear, so search both to allow a second adapter on them.
    targets = find_targets(model, cfg.target_modules, types=(nn.Linear, AdapterLinear, QuantizedLinear))
    for name in targets:
        wrap_linear(model, name).add_lora(adapter_name, cfg.r, cfg.scale, cfg.dropout, kind=kind)
    return targets


@register_method("lora")
def add_lora(model: nn.Module, cfg, adapter_name: str) -> None:
    add_lora_layers(model, cfg, adapter_name, kind="lora")
