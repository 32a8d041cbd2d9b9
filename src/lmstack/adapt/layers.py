"""AdapterLinear: a Linear plus any number of named low-rank adapters (PEFT's layer design).

The original layer stays intact as `base_layer` (an nn.Linear, or a compress.QuantizedLinear for
QLoRA). Each kind of adapter weight lives in its own ModuleDict/ParameterDict keyed by adapter name,
so one base can carry many adapters: `lora_A[name]`, `lora_B[name]`, `lora_dropout[name]` and, for
DoRA, `lora_magnitude[name]`. `kind[name]` says how an adapter changes the output; the kinds are a
small registry (KINDS) of three functions: forward, merge and unmerge.

Usage:
    layer = AdapterLinear(nn.Linear(64, 64))
    layer.add_lora("default", r=8, scale=2.0)          # A kaiming-uniform, B = 0: a no-op until trained
    y = layer(x)                                       # base(x) + 2.0 * B(A(dropout(x)))
    layer.active_adapters = ["default", "other"]       # several active adapters add up
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lmstack.errors import LmstackError


@dataclass(frozen=True)
class Kind:
    """How adapters of one kind act: forward(layer, name, x, out) -> out; merge/unmerge(layer, name, W) -> W."""

    forward: Callable
    merge: Callable
    unmerge: Callable


KINDS: dict[str, Kind] = {}


def register_kind(name: str, forward: Callable, merge: Callable, unmerge: Callable) -> None:
    KINDS[name] = Kind(forward, merge, unmerge)


class AdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()
        self.kind: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set by router.py for one forward: (adapter names, per-example weights (B, n)); the output is then
        # sum_i w_i * (output with adapter i), a per-input mixture of adapters.
        self.mixture: tuple[list[str], torch.Tensor] | None = None
        # While adapters are merged into a quantized base, the quantized layer waits here (a list, so it is not
        # registered as a submodule and stays out of the state dict).
        self._quantized_base: list[nn.Module] = []
        self._cache: dict[str, torch.Tensor] = {}  # e.g. DoRA's weight norm at merge time, needed to unmerge

    # ---- what the rest of the model sees: the base layer's shapes and weight
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def names(self) -> list[str]:
        return list(self.kind)

    def base_weight(self) -> torch.Tensor:
        """The base weight (out, in) in float, dequantized when the base is stored quantized."""
        if hasattr(self.base_layer, "dequantize"):
            return self.base_layer.dequantize()
        return self.base_layer.weight

    def set_base_weight(self, w: torch.Tensor) -> None:
        if hasattr(self.base_layer, "dequantize"):
            # A quantized base cannot hold a merged weight exactly (re-rounding it would change the model), so
            # merging swaps in a float Linear and keeps the quantized layer aside; unmerging everything puts
            # it back unchanged. Merged QLoRA layers therefore cost fp32 memory until unmerged.
            q = self.base_layer
            self._quantized_base = [q]
            self.base_layer = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                                        device=w.device, dtype=w.dtype).requires_grad_(False)
            if q.bias is not None:
                with torch.no_grad():
                    self.base_layer.bias.copy_(q.bias)
        with torch.no_grad():
            self.base_layer.weight.copy_(w)

    # ---- adding adapters
    def add_lora(self, name: str, r: int, scale: float, dropout: float = 0.0, kind: str = "lora") -> None:
        if name in self.kind:
            raise LmstackError(f"layer already has an adapter named {name!r}")
        if kind not in KINDS:
            raise LmstackError(f"unknown adapter kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        ref = self.base_weight()
        a = nn.Linear(self.in_features, r, bias=False, device=ref.device, dtype=ref.dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=ref.device, dtype=ref.dtype)
        # PEFT's init: A like a default nn.Linear (kaiming-uniform, a=sqrt(5)), B = 0, so B A = 0 at the start and
        # the adapted model equals the base model until the first step.
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kind[name], self.scaling[name] = kind, float(scale)
        self.active_adapters.append(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A, shape (out, in): the low-rank update of adapter `name`."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LmstackError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting")
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude):
            if name in d:
                del d[name]
        self.kind.pop(name, None)
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        if self.mixture is not None:
            names, w = self.mixture
            w = w.to(out.dtype).view(w.shape[0], *([1] * (out.dim() - 1)), w.shape[1])
            return sum(w[..., i] * KINDS[self.kind[n]].forward(self, n, x, out) for i, n in enumerate(names))
        if len(self.active_adapters) > 1 and any(self.kind[n] == "dora" for n in self.active_adapters):
            # DoRA renormalises the whole weight, so "adding" it to another adapter has no single meaning.
            raise LmstackError(f"a DoRA adapter cannot be active together with others on one layer; active: "
                               f"{self.active_adapters}")
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = KINDS[self.kind[name]].forward(self, name, x, out)
        return out

    # ---- merging
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        self.set_base_weight(KINDS[self.kind[name]].merge(self, name, self.base_weight().detach()))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        self.merged_adapters.remove(name)
        if self._quantized_base and not self.merged_adapters:
            self.base_layer = self._quantized_base.pop()
            KINDS[self.kind[name]].unmerge(self, name, self.base_weight().detach())  # pops merge-time state
            return
        self.set_base_weight(KINDS[self.kind[name]].unmerge(self, name, self.base_weight().detach()))

    def extra_repr(self) -> str:
        return f"adapters={self.names}, active={self.active_adapters}, merged={self.merged_adapters}"


# ---- plain LoRA (Hu et al. 2021): out + scale * B A dropout(x)
def _lora_forward(layer: AdapterLinear, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A[name], layer.lora_B[name]
    # Scale the rank-r activations, not the (.., out) result: r multiplies per token instead of out_features.
    return out + b(a(layer.lora_dropout[name](x.to(a.weight.dtype))) * layer.scaling[name]).to(out.dtype)


register_kind("lora", _lora_forward,
              merge=lambda layer, name, w: w + layer.delta_weight(name).to(w),
              unmerge=lambda layer, name, w: w - layer.delta_weight(name).to(w))
