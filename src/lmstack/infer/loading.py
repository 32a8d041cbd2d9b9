"""Loading for the engine: a model directory or module -> (eval-mode model, tokenizer), and the draft model.

Both the engine and the speculative decoder load models; keeping the loader here (not in engine.py) lets
speculative.py import it without importing the engine.

Usage:
    model, tokenizer = load_model_and_tokenizer("runs/model", None, torch.float32, "cpu")
    draft = load_draft(draft_dir_or_module, target_model)    # same dtype/device, same vocabulary
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import LmstackError
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import load_tokenizer
from lmstack.tokenizer.core import has_tokenizer


def load_model_and_tokenizer(model: Any, tokenizer: Any, dtype: torch.dtype, device: str):
    """A path or a module -> (eval-mode model, tokenizer or None)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = load_model(path, dtype=dtype, device=device)
        if tokenizer is None and has_tokenizer(path):  # tokenizer.json, or a SentencePiece tokenizer.model
            tokenizer = load_tokenizer(path)
    elif isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype)
    else:
        raise LmstackError(f"model must be a model directory or a Transformer, got {type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return model.eval(), tokenizer


def load_draft(draft: Any, target: torch.nn.Module) -> torch.nn.Module:
    """The speculative draft model, on the target's dtype and device; its vocabulary must be the target's."""
    p = next(target.parameters())
    model, _ = load_model_and_tokenizer(draft, None, p.dtype, str(p.device))
    if model.config.vocab_size != target.config.vocab_size:
        raise LmstackError(f"the draft model's vocab_size ({model.config.vocab_size}) differs from the "
                           f"target's ({target.config.vocab_size}); they must share a tokenizer")
    return model
