"""DoRA (Liu et al. 2024): split each adapted weight into a magnitude and a LoRA-updated direction.

    W' = m * (W + s B A) / ||W + s B A||_row

m (one number per output feature) starts as the row norms of W (B = 0 at init, so W' = W: a new adapter
is a no-op), and trains with A and B. As in the paper (section 4.3) and PEFT, the norm is treated as a
constant in the backward pass (detached): it saves memory and barely changes the gradient.
The forward never forms W' for x; it rescales the base output and the LoRA output instead:
    y = (m / n) * (x W^T + s x A^T B^T) + b,   n = ||W + s B A||_row

Usage:
    model = get_peft_model(model, AdapterConfig(method="dora", r=8, target_modules=["q_proj", "v_proj"]))
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.layers import AdapterLinear, register_kind
from lmstack.adapt.lora import add_lora_layers
from lmstack.adapt.registry import register_method


def weight_norm(layer: AdapterLinear, name: str, w: torch.Tensor) -> torch.Tensor:
    """Row norms (one per output feature) of W + s B A."""
    return (w + layer.delta_weight(name).to(w)).norm(dim=1)


def _dora_forward(layer: AdapterLinear, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A[name], layer.lora_B[name]
    w = layer.base_weight()
    scale = layer.lora_magnitude[name] / weight_norm(layer, name, w).detach()
    bias = layer.base_layer.bias
    base = out - bias if bias is not None else out            # x W^T without the bias
    lora = b(a(layer.lora_dropout[name](x.to(a.weight.dtype))) * layer.scaling[name]).to(out.dtype)
    # out + (scale - 1) * xW^T + scale * lora == scale * (xW^T + lora) + bias
    return out + (scale - 1) * base + scale * lora


def _dora_merge(layer: AdapterLinear, name: str, w: torch.Tensor) -> torch.Tensor:
    norm = weight_norm(layer, name, w)
    layer._cache[f"{name}-weight_norm"] = norm  # unmerge cannot recompute it: it depends on the unmerged W
    return (layer.lora_magnitude[name].detach() / norm)[:, None] * (w + layer.delta_weight(name).to(w))


def _dora_unmerge(layer: AdapterLinear, name: str, w: torch.Tensor) -> torch.Tensor:
    norm = layer._cache.pop(f"{name}-weight_norm")
    return w * (norm / layer.lora_magnitude[name].detach())[:, None] - layer.delta_weight(name).to(w)


register_kind("dora", _dora_forward, _dora_merge, _dora_unmerge)


def init_magnitude(layer: AdapterLinear, name: str) -> None:
    with torch.no_grad():
        m = weight_norm(layer, name, layer.base_weight())
    layer.lora_magnitude[name] = nn.Parameter(m.clone())


@register_method("dora")
def add_dora(model: nn.Module, cfg, adapter_name: str) -> None:
    for target in add_lora_layers(model, cfg, adapter_name, kind="dora"):
        init_magnitude(model.get_submodule(target), adapter_name)
