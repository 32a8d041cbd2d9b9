"""Multi-LoRA serving hook: requests name an adapter, and one batch can mix adapters (and the base model).

The interface is a registry name -> adapter, where an adapter is any object with
    apply(module_name: str, x: Tensor, base_out: Tensor) -> Tensor
called for every nn.Linear of the model (module_name as in model.named_modules(), e.g.
"blocks.0.attn.q_proj") on the rows of the flat batch that belong to requests using that adapter:
x is the Linear's input (1, n, in), base_out its output (1, n, out); it returns the adapted output.
The fine-tuning stage (lmstack.adapt) fills adapters in; LinearLoRA below is the plain LoRA case
(Hu et al. 2021): out = base_out + scale * (x A^T) B^T for the modules it has weights for.

Adapters name the split projections (q_proj, k_proj, v_proj, gate_proj, up_proj), as PEFT does. On a model
with fused projections (model/fused_projections.py, what the engine makes of a model it loads) the hook on
a fused qkv_proj / gate_up_proj calls the adapter once per part, with that part's rows of the output, so
"blocks.0.attn.q_proj" still adapts the q rows.

How: forward hooks on every Linear. The engine marks, for each step, which token rows belong to
which adapter (a request's rows are contiguous in the flattened batch), so base rows cost nothing
and the base GEMM still runs once for the whole batch (S-LoRA / Punica style). Adapters also get
their own prefix-cache namespace (block_manager.root_hash), since their K/V differ.

Usage:
    lora = LinearLoRA({"blocks.0.attn.q_proj": (A, B)}, scale=2.0)
    llm = LLM(model, tokenizer=tok, lora_adapters={"math": lora})
    llm.generate(["2+2="], SamplingParams(max_tokens=4), lora="math")
    llm.engine.lora.register("code", other_adapter)
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from lmstack.errors import LmstackError


class Adapter(Protocol):
    def apply(self, module_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor: ...


class LinearLoRA:
    """Low-rank deltas for some Linear modules: module name -> (A (r, in), B (out, r))."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0):
        for name, (a, b) in weights.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise LmstackError(f"LoRA weights for {name!r} must be A (r, in) and B (out, r), got "
                                   f"{tuple(a.shape)} and {tuple(b.shape)}")
        self.weights, self.scale = weights, scale

    def apply(self, module_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.weights.get(module_name)
        if w is None:
            return base_out
        a, b = w
        return base_out + self.scale * ((x @ a.t().to(x)) @ b.t().to(x))

    @classmethod
    def random(cls, model: nn.Module, rank: int = 1, targets: tuple[str, ...] = ("q_proj", "v_proj"),
               std: float = 0.05, scale: float = 1.0, seed: int = 0) -> "LinearLoRA":
        """Random adapter weights on the Linears whose name ends with one of `targets` (tests, benchmarks)."""
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            parent = name.rpartition(".")[0]
            # a fused Linear stands for its parts (q_proj, k_proj, ...), which adapters name
            parts = getattr(mod, "parts", None) or [(name.split(".")[-1], mod.out_features)]
            for part, rows in parts:
                if part in targets:
                    weights[f"{parent}.{part}" if parent else part] = (
                        torch.randn(rank, mod.in_features, generator=g) * std, torch.randn(rows, rank, generator=g) * std)
        if not weights:
            raise LmstackError(f"no Linear module of the model ends with any of {targets}")
        return cls(weights, scale)


class LoraManager:
    """Holds the adapter registry and applies adapters to their requests' rows during a forward."""

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter] | None = None):
        self.adapters: dict[str, Adapter] = {}
        for name, adapter in (adapters or {}).items():
            self.register(name, adapter)
        self.segments: list[tuple[int, int, Adapter]] = []
        self.handles = [mod.register_forward_hook(self._hook(name, mod))
                        for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]

    def register(self, name: str, adapter: Adapter) -> None:
        if not isinstance(name, str) or not name:
            raise LmstackError(f"an adapter name must be a non-empty string, got {name!r}")
        if not callable(getattr(adapter, "apply", None)):
            raise LmstackError(f"adapter {name!r} has no apply(module_name, x, base_out) method")
        self.adapters[name] = adapter

    @property
    def active(self) -> bool:
        return bool(self.segments)

    def add_segment(self, start: int, length: int, name: str | None) -> None:
        """Rows [start, start + length) of the next forward belong to adapter `name` (None = base)."""
        if name is not None:
            self.segments.append((start, length, self.adapters[name]))

    def clear_segments(self) -> None:
        self.segments = []

    def _hook(self, module_name: str, module: nn.Module):
        parts = getattr(module, "parts", None)  # a FusedLinear: (part name, rows) in row order
        if parts is not None:
            parent = module_name.rpartition(".")[0]
            names = [f"{parent}.{name}" if parent else name for name, _ in parts]
            sizes = [rows for _, rows in parts]

        def apply(adapter: Adapter, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
            if parts is None:
                return adapter.apply(module_name, x, base_out)
            return torch.cat([adapter.apply(name, x, piece) for name, piece in zip(names, base_out.split(sizes, -1))],
                             dim=-1)

        def hook(module, inputs, output):
            if not self.segments or output.dim() != 3:
                return None
            x = inputs[0]
            out = output.clone()
            for start, length, adapter in self.segments:
                sl = slice(start, start + length)
                out[:, sl] = apply(adapter, x[:, sl], output[:, sl])
            return out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
