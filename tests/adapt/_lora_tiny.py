"""Shared helpers of the LoRA-family tests: the tiny model, a fixed input, and "trained" adapter weights.

(conftest.py exposes the model as fixtures; a uniquely named module lets tests import the helpers
without clashing with the other conftest.py files of the suite.)"""
from __future__ import annotations

import torch

from lmstack.model import Transformer
from lmstack.model.presets import preset

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.2)
X = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))


def make_tiny(seed: int = 0, **overrides) -> Transformer:
    """A fresh llama-family Transformer (vocab 96, d_model 32, 2 layers, GQA 4/2 heads) in eval mode.

    init_std 0.2 instead of 0.02, so adapters visibly move its logits."""
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", **{**TINY, **overrides})
    cfg.name = "adapt-test-tiny"  # adapters record their base's name
    return Transformer(cfg).eval()


def train_like(model, std: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA-family adapter random B (and DoRA magnitudes), as training would, so it changes the model."""
    from lmstack.adapt.lora import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name in layer.kind:
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=g) * std)
                if name in layer.lora_magnitude:
                    layer.lora_magnitude[name].mul_(1 + 0.2 * torch.rand(b.shape[0], generator=g))
