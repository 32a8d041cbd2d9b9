"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale keys, values and the MLP's hidden activation.

Per layer three vectors: l_k (n_kv_heads*head_dim) multiplies k_proj's output, l_v multiplies
v_proj's output, and l_ff (d_ff) multiplies the MLP's intermediate activation (the input of
down_proj). All start at one, so a new adapter is an exact no-op. That is the fewest trainable
parameters of any method here: n_layers * (2 * kv_dim + d_ff).

MoE layers keep their experts' activations unscaled (the experts run inside one fused module);
they get l_k and l_v only, and so does a shared-expert MLP's down_proj if it has one.

The vectors sit on the Linears through hooks (`<linear>.ia3.scales[name]`), so base names are
unchanged. Because each one scales a Linear's output rows (k, v) or input columns (down_proj),
merge_ia3 folds it into the weight exactly.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="ia3"))
    ...train...
    merge_ia3(model, "default")        # W_k <- diag(l_k) W_k, W_down <- W_down diag(l_ff); hooks become no-ops
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError


class ScaleSlot(Switchable):
    """Named scaling vectors on one Linear: on its output (where='out') or its input (where='in')."""

    store_name = "scales"

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.scales = nn.ParameterDict()

    def scale(self) -> torch.Tensor | None:
        """The product of the acting vectors (several IA3 adapters compose by multiplying)."""
        names = self.acting()
        if not names:
            return None
        s = self.scales[names[0]]
        for name in names[1:]:
            s = s * self.scales[name]
        return s

    def pre_hook(self, module: nn.Module, args: tuple):
        s = self.scale()
        return None if s is None else (args[0] * s,) + tuple(args[1:])

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor):
        s = self.scale()
        return None if s is None else out * s


def _attach(linear: nn.Module, where: str, name: str, size: int, ref: torch.Tensor) -> None:
    slot = getattr(linear, "ia3", None)
    if slot is None:
        slot = ScaleSlot(where)
        linear.ia3 = slot
        if where == "out":
            linear.register_forward_hook(slot.hook)
        else:
            linear.register_forward_pre_hook(slot.pre_hook)
    slot.scales[name] = nn.Parameter(torch.ones(size, device=ref.device, dtype=ref.dtype))


def ia3_targets(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(linear, 'out'|'in', vector length) for every k_proj, v_proj and dense-MLP down_proj."""
    out = []
    for block in model.blocks:
        out.append((block.attn.k_proj, "out", block.attn.k_proj.out_features))
        out.append((block.attn.v_proj, "out", block.attn.v_proj.out_features))
        mlp = block.mlp if hasattr(block.mlp, "down_proj") else getattr(block.mlp, "shared", None)
        if mlp is not None:
            out.append((mlp.down_proj, "in", mlp.down_proj.in_features))
    return out


@register_method("ia3")
def add_ia3(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add IA3 vectors (all ones) on every layer's keys, values and MLP activation."""
    if not hasattr(model, "blocks"):
        raise LmstackError("IA3 needs an lmstack Transformer (with .blocks)")
    ensure_sync(model)
    ref = next(model.parameters())
    for linear, where, size in ia3_targets(model):
        _attach(linear, where, adapter_name, size, ref)


def merge_ia3(model: nn.Module, adapter_name: str = "default") -> None:
    """Fold IA3 adapter `adapter_name` into the weights and delete it; logits are unchanged."""
    found = False
    for module in model.modules():
        slot = getattr(module, "ia3", None)
        if not isinstance(slot, ScaleSlot) or adapter_name not in slot.scales:
            continue
        found = True
        s = slot.scales[adapter_name].detach()
        with torch.no_grad():
            if slot.where == "out":
                module.weight.mul_(s[:, None])
                if module.bias is not None:
                    module.bias.mul_(s)
            else:
                module.weight.mul_(s[None, :])
        slot.delete(adapter_name)
    if not found:
        raise LmstackError(f"the model has no IA3 adapter named {adapter_name!r}")
