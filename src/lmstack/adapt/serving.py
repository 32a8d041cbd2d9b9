"""load_serving_adapter: a PEFT adapter directory -> an adapter object for the inference engine's hook.

It leaves the model as it is (apply_adapter in peft_format adds an adapter to a model instead).

The engine (lmstack.infer.lora_hook) calls adapter.apply(module_name, x, base_out) on the rows of the
batch that belong to a request using the adapter, so one batch can mix adapters and the base model.
Plain LoRA becomes the engine's own LinearLoRA (with each module's scale folded into B, since
rank/alpha patterns can give modules different scales); DoRA gets DoraAdapter below, which rescales
the base output by m / ||W + s B A|| (computed once at load time from the served model's weights).

Usage:
    adapter = load_serving_adapter(model, "out/adapter")  # model: the lmstack Transformer being served
    llm = LLM(model, tokenizer=tok, lora_adapters={"math": adapter})
    llm.generate(["2+2="], SamplingParams(max_tokens=4), lora="math")
"""
from __future__ import annotations

import os

import torch
from torch import nn

from lmstack.adapt.peft_format import adapter_weights
from lmstack.infer.lora_hook import LinearLoRA


class DoraAdapter:
    """DoRA for the serving hook: out = (m / n) * (base_out - bias + s x A^T B^T) + bias."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]):
        self.weights = weights  # module name -> (A, s * B, m / n, bias)

    def apply(self, module_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.weights.get(module_name)
        if w is None:
            return base_out
        a, b, ratio, bias = w
        base = base_out - bias.to(base_out) if bias is not None else base_out
        out = ratio.to(base_out) * (base + (x @ a.t().to(x)) @ b.t().to(x))
        return out + bias.to(base_out) if bias is not None else out


@torch.no_grad()
def load_serving_adapter(model: nn.Module, path: str | os.PathLike):
    """The adapter at `path` (PEFT format, LoRA or DoRA) as an object with apply(module_name, x, base_out).

    Shapes are checked against `model`; an adapter made for another base is refused, naming that base."""
    config, weights = adapter_weights(model, path)
    if not config.get("use_dora"):
        return LinearLoRA({name: (w["A"].float(), w["scale"] * w["B"].float()) for name, w in weights.items()})
    dora = {}
    for name, w in weights.items():
        module = model.get_submodule(name)
        base = module.base_weight() if hasattr(module, "base_weight") else module.weight
        a, b = w["A"].float(), w["scale"] * w["B"].float()
        norm = (base.float() + b @ a).norm(dim=1)
        magnitude = w["magnitude"].float() if w["magnitude"] is not None else norm
        bias = module.bias.detach().float() if module.bias is not None else None
        dora[name] = (a, b, magnitude / norm, bias)
    return DoraAdapter(dora)
