"""lmstack: the whole LLM stack in one readable package.

Usage:
    import lmstack
    model = lmstack.load_model("path/to/model_dir")      # our dir or an HF dir -> torch.nn.Module
    logits = model(input_ids)                            # decoder: (B, T, vocab)
    tok = lmstack.load_tokenizer("path/to/model_dir")    # tokenizer.json (ours or HF's)
    lmstack.save_model(model, "out_dir")                 # HF layout

Names are imported lazily, so `import lmstack` stays fast and pulls in only what is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "lmstack.model.config",
    "Transformer": "lmstack.model.transformer",
    "load_model": "lmstack.model.hf_io",
    "save_model": "lmstack.model.hf_io",
    "load_tokenizer": "lmstack.tokenizer",
    "train_tokenizer": "lmstack.tokenizer",
    "Tokenizer": "lmstack.tokenizer",
    "LLM": "lmstack.infer",
    "SamplingParams": "lmstack.infer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")
