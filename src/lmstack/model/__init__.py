"""The model stage: one configurable Transformer, its presets, KV caches, HF interop and counting.

Usage:
    from lmstack.model import ModelConfig, Transformer, preset
    model = Transformer(preset("llama-tiny"))
"""
from lmstack.model.config import ModelConfig
from lmstack.model.presets import PRESETS, preset
from lmstack.model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "preset"]
