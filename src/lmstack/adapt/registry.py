"""The registry of fine-tuning methods, and the three calls every method shares.

A method is a function add(model, cfg, adapter_name) that edits the model in place (wraps Linears,
registers hooks, adds parameters). get_peft_model freezes the base first, so after it exactly the
new adapter weights train; add_adapter adds another named adapter without touching what trains.
The config of every adapter is kept on the model in `model.adapter_configs` (name -> AdapterConfig),
so save/merge code can find it later; `model.active_adapters` lists the active ones (the first adapter
added; lmstack.adapt.multi.set_adapter switches).

Usage:
    from lmstack.adapt.registry import register_method, get_peft_model, trainable_report
    @register_method("mine")
    def add_mine(model, cfg, adapter_name): ...
    model = get_peft_model(model, AdapterConfig(method="lora"))
    trainable_report(model)     # {"trainable": 2048, "total": 110000, "trainable_pct": 1.86}
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from lmstack.adapt.layers import AdapterLinear
from lmstack.errors import LmstackError

METHODS: dict[str, Callable[[nn.Module, "AdapterConfig", str], None]] = {}


def register_method(name: str):
    """Decorator: METHODS[name] = the decorated add(model, cfg, adapter_name) function."""
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


def _matches(name: str, pattern: str) -> bool:
    # A plain suffix ("q_proj", "attn.q_proj") is the common case; anything else is a regex over the full name.
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, patterns: list[str], types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the modules of `types` that match any of `patterns` (suffix or re.fullmatch on the name).

    Raises LmstackError naming every pattern that matches no module, so a typo never trains nothing."""
    names = [n for n, m in model.named_modules() if isinstance(m, types) and n]
    # Modules already wrapped by an adapter layer expose their original Linear as `.base_layer`; target the
    # wrapper, never the inner Linear.
    names = [n for n in names if not n.endswith(".base_layer")]
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if unmatched:
        sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise LmstackError(f"target_modules pattern(s) {unmatched} match no {'/'.join(t.__name__ for t in types)} "
                           f"module of the model; its modules are named like: {sample}")
    return [n for n in names if any(_matches(n, p) for p in patterns)]


def add_adapter(model: nn.Module, cfg, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` of method cfg.method to `model` in place; returns the model."""
    if cfg.method not in METHODS:
        raise LmstackError(f"method {cfg.method!r} is not available; registered methods: {', '.join(sorted(METHODS))}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LmstackError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    if cfg.method != "full" and getattr(getattr(model, "config", None), "fused_projections", False):
        # adapters name the split Linears (q_proj, k_proj, v_proj, gate_proj, up_proj), as PEFT does
        raise LmstackError("the model has fused projections (qkv_proj, gate_up_proj; config.fused_projections), but "
                           "adapters target the split q/k/v and gate/up Linears: call model.unfuse_projections() first")
    configs = getattr(model, "adapter_configs", None)
    if configs is None:
        configs = {}
        model.adapter_configs = configs
    if adapter_name in configs:
        raise LmstackError(f"the model already has an adapter named {adapter_name!r}; delete it or pick another name")
    before = [n for n in getattr(model, "active_adapters", []) if n in configs]
    METHODS[cfg.method](model, cfg, adapter_name)
    configs[adapter_name] = cfg
    # As in PEFT, the first adapter becomes active and later ones wait for set_adapter, so adding an adapter
    # never changes what the model computes.
    if before:
        for m in model.modules():
            if isinstance(m, AdapterLinear):
                m.active_adapters = [n for n in before if n in m.kind]
    else:
        model.active_adapters = [adapter_name]
    return model


def get_peft_model(model: nn.Module, cfg, adapter_name: str = "default") -> nn.Module:
    """Freeze every base parameter (except for method 'full'), then add the adapter; returns the model."""
    if cfg.method != "full":
        for p in model.parameters():
            p.requires_grad_(False)
    return add_adapter(model, cfg, adapter_name)


def trainable_report(model: nn.Module) -> dict:
    """{"trainable": n, "total": n, "trainable_pct": x}. Quantized base weights (stored as buffers by
    lmstack.compress.QuantizedLinear) count towards the total by their number of weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(int(getattr(m, "n_quantized_params", 0)) for m in model.modules())
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


@register_method("full")
def _add_full(model: nn.Module, cfg, adapter_name: str) -> None:
    """Full fine-tuning: the baseline. Nothing is added or frozen; every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
