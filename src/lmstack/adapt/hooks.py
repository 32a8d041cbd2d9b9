"""Shared plumbing of the hook-based methods (prefix, prompt, bottleneck adapters, IA3, hypernetwork).

These methods keep their weights in small container modules (Switchable) and act through forward
hooks. Which named adapters act is decided on the model, as for LoRA: `model.active_adapters`
(set by add_adapter and multi.set_adapter) and `model.adapters_disabled` (multi.disable_adapters).
A forward pre-hook on the model copies that choice into every container before each forward, so the
sublayer hooks need no reference back to the model (which would break copy.deepcopy).

Usage (inside a method's add function):
    ensure_sync(model)                  # once per model, before the method's own model-level hooks
    class MySlot(Switchable): store_name = "scales"     # self.acting() -> the adapter names to apply now
"""
from __future__ import annotations

from torch import nn


class Switchable(nn.Module):
    """A container of named adapters, kept in the dict attribute `store_name` names. `disabled` turns it off
    locally; `current` mirrors the model's choice."""

    store_name = "adapters"

    def __init__(self):
        super().__init__()
        self.current: list[str] | None = None  # None: never synced, every adapter acts
        self.disabled = False

    @property
    def names(self) -> list[str]:
        return list(getattr(self, self.store_name))

    def delete(self, name: str) -> None:
        del getattr(self, self.store_name)[name]

    def acting(self) -> list[str]:
        if self.disabled:
            return []
        own = self.names
        return own if self.current is None else [n for n in self.current if n in own]


def sync_active(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook: push model.active_adapters / model.adapters_disabled into every Switchable."""
    disabled = getattr(model, "adapters_disabled", False)
    active = getattr(model, "active_adapters", None)
    for m in model.modules():
        if isinstance(m, Switchable):
            m.current = [] if disabled else (None if active is None else list(active))


def ensure_sync(model: nn.Module) -> None:
    if not getattr(model, "_adapter_sync", False):
        model.register_forward_pre_hook(sync_active)
        model._adapter_sync = True
