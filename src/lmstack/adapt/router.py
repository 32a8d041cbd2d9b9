"""A learned mixture of adapters: a small gate looks at the input and mixes adapters per example.

The gate scores each input token's embedding (the base model's own, frozen embedding) with a small
MLP, averages the scores over the sequence (pooling after the MLP lets the gate recognise tokens; a
linear gate on the mean embedding cannot separate most token sets) and gives softmax weights over the
adapters; every adapted layer then outputs
sum_i w_i * (its output with adapter i alone), for each example of the batch its own mixture
(in the spirit of LoRAHub / mixture-of-LoRA-experts routers, with a per-sequence gate). Training the
router alone (adapters frozen) teaches it which adapter suits which input.

Usage:
    router = AdapterRouter(model, ["math", "code"])
    opt = torch.optim.AdamW(router.gate.parameters(), lr=1e-2)
    logits = router(idx)                 # (B, T, vocab); router.last_weights is (B, 2)
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.lora import adapter_layers
from lmstack.errors import LmstackError


class AdapterRouter(nn.Module):
    def __init__(self, model: nn.Module, adapter_names: list[str], hidden: int = 32, temperature: float = 1.0):
        super().__init__()
        layers = adapter_layers(model)
        known = {n for layer in layers.values() for n in layer.kind}
        missing = [n for n in adapter_names if n not in known]
        if len(adapter_names) < 2 or missing:
            raise LmstackError(f"a router mixes at least two adapters of the model; unknown: {missing}, "
                               f"the model has {sorted(known)}")
        if temperature <= 0:
            raise LmstackError(f"temperature={temperature!r} is not allowed; it must be > 0")
        self.names, self.temperature = list(adapter_names), temperature
        # Keep the model out of this module's parameters (and state dict): the router trains only its gate.
        self._model = [model]
        self._layers = [layer for layer in layers.values() if all(n in layer.kind for n in self.names)]
        if not self._layers:
            raise LmstackError(f"no layer carries all of the adapters {self.names}")
        d = model.tok_emb.embedding_dim
        self.gate = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, len(self.names)))
        nn.init.zeros_(self.gate[2].weight)  # start from the uniform mixture
        nn.init.zeros_(self.gate[2].bias)
        self.last_weights: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, n_adapters) mixture weights for a batch of token ids."""
        scores = self.gate(self.model.tok_emb(idx).detach()).mean(dim=1)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        w = self.weights(idx)
        self.last_weights = w.detach()
        for layer in self._layers:
            if layer.merged_adapters:
                raise LmstackError("routing needs unmerged adapters; call unmerge_adapter first")
            layer.mixture = (self.names, w)
        try:
            return self.model(idx, **kwargs)
        finally:
            for layer in self._layers:
                layer.mixture = None
