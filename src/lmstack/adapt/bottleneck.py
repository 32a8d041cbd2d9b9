"""Houlsby bottleneck adapters (Houlsby et al. 2019): small residual MLPs after attention and after the MLP.

Each block's attention output h and MLP output h become h + up(act(down(h))) before they join the
residual stream: down projects d_model -> bottleneck_dim, up projects back. `up` starts at zero, so
a new adapter is an exact no-op and training starts from the base model. The adapters sit on the
sublayers through forward hooks, so module names and the base state dict stay unchanged; their
weights live on each block as `block.adapters_attn[name]` and `block.adapters_mlp[name]`.

PEFT has no Houlsby adapters; per adapter the cost is 2 * n_layers * (2 * d_model * b + b + d_model)
parameters.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="adapter", bottleneck_dim=16))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError


class Bottleneck(nn.Module):
    """x -> x + up(gelu(down(x))), with up zero-initialised."""

    def __init__(self, d_model: int, bottleneck_dim: int):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


class AdapterSlot(Switchable):
    """The named adapters behind one sublayer; the forward hook runs the acting ones in order."""

    store_name = "adapters"

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        names = self.acting()
        if not names:
            return None
        for name in names:
            out = self.adapters[name](out)
        return out


def _slot(block: nn.Module, attr: str, sublayer: nn.Module) -> AdapterSlot:
    slot = getattr(block, attr, None)
    if slot is None:
        slot = AdapterSlot()
        setattr(block, attr, slot)
        sublayer.register_forward_hook(slot.hook)
    return slot


@register_method("adapter")
def add_bottleneck(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a Houlsby adapter of width cfg.bottleneck_dim after every attention and every MLP of `model`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmstackError("bottleneck adapters need an lmstack Transformer (with .blocks)")
    ensure_sync(model)
    ref = next(model.parameters())
    d_model = model.config.d_model
    for block in blocks:
        for attr, sublayer in (("adapters_attn", block.attn), ("adapters_mlp", block.mlp)):
            slot = _slot(block, attr, sublayer)
            slot.adapters[adapter_name] = Bottleneck(d_model, cfg.bottleneck_dim).to(device=ref.device, dtype=ref.dtype)
