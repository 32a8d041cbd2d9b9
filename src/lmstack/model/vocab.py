"""Padded and mismatched vocabularies: one definition of which token ids a model can emit.

A model's embedding table often has more rows than its tokenizer has tokens: the speedrun rounds
3,743 BPE tokens up to 4,096 so matmuls hit fast shapes. Rows past the tokenizer are padding. They
are never a training target, so left alone their logits hold whatever mass the init gives them until
training slowly pushes it down, and every consumer that takes a softmax over the full row (training,
local scoring) disagrees with one that cuts it (the engine, the server).

The rule, applied in one place (the LM head, see Transformer.head):
  - ModelConfig.real_vocab_size says how many rows are real (None: all of them);
  - the head sets the logits of rows >= real_vocab_size to PAD_LOGIT, so their probability is exactly
    zero in training and inference alike, and they get no gradient.
PAD_LOGIT is finite (-1e30), not -inf: exp() underflows to exactly 0 all the same, but KL and entropy
terms multiply probabilities by log-probabilities, and 0 * -inf is NaN while 0 * -1e30 is 0. (A loss that
sums log-probabilities over every row, like label smoothing over the full table, must cut to the real
rows first: padded rows are not classes.)

A tokenizer larger than the model's real vocabulary can produce ids the model cannot score;
check_vocab refuses that pair once, at load time, with an error naming both sizes and both paths.
A tokenizer smaller than the model (an older padded checkpoint without real_vocab_size, or a
tokenizer that simply uses fewer ids) is fine: emit_vocab_size cuts to the tokenizer's ids.

Usage:
    from lmstack.model.vocab import check_vocab, emit_vocab_size, mask_padded_logits
    check_vocab(model, tokenizer, model_path="runs/m", tokenizer_path="runs/tok")   # LmstackError if too big
    n = emit_vocab_size(model.config, tokenizer)          # ids a sampler / scorer may see
    logp = model(ids)[..., :n].log_softmax(-1)            # same numbers in LocalLM, the engine and the server
"""
from __future__ import annotations

from typing import Any

import torch

from lmstack.errors import LmstackError

PAD_LOGIT = -1e30


def real_vocab(cfg: Any) -> int:
    """Rows of the LM head that are real tokens: cfg.real_vocab_size, or vocab_size when it is None."""
    real = getattr(cfg, "real_vocab_size", None)
    return cfg.vocab_size if real is None else real


def mask_padded_logits(logits: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Logits (..., vocab_size) with the padded rows set to PAD_LOGIT (a no-op without padding)."""
    real = real_vocab(cfg)
    if real >= logits.shape[-1]:
        return logits
    # Clamp to the dtype's range: -1e30 overflows fp16 to -inf, which the comment above rules out.
    fill = max(PAD_LOGIT, torch.finfo(logits.dtype).min)
    keep = torch.arange(logits.shape[-1], device=logits.device) < real
    return logits.masked_fill(~keep, fill)


def tokenizer_size(tokenizer: Any) -> int | None:
    return None if tokenizer is None else int(tokenizer.vocab_size)


def emit_vocab_size(cfg: Any, tokenizer: Any = None) -> int:
    """Ids a sampler or scorer may see: the model's real rows, cut to the tokenizer's ids when it has fewer.

    The engine (and through it the server) and LocalLM all cut logits to this, so their log-probabilities
    are the same numbers."""
    n_tok = tokenizer_size(tokenizer)
    real = real_vocab(cfg)
    return real if n_tok is None else min(real, n_tok)


def check_vocab(model: Any, tokenizer: Any, *, model_path: Any = None, tokenizer_path: Any = None,
                what: str = "", hint: str = "") -> int:
    """Refuse a tokenizer whose ids the model cannot score; returns emit_vocab_size.

    model: a Transformer or a ModelConfig. Called once per stage at load time, so a bad pair fails with one
    line instead of an IndexError deep inside an embedding lookup. hint replaces the closing advice."""
    cfg = getattr(model, "config", model)
    if not hasattr(cfg, "vocab_size"):  # a wrapped model that does not say its size: nothing to check against
        n_tok = tokenizer_size(tokenizer)
        if n_tok is None:
            raise LmstackError(f"{what + ': ' if what else ''}neither the model nor a tokenizer gives a vocabulary size")
        return n_tok
    if tokenizer is None:
        return real_vocab(cfg)
    n_tok, real = tokenizer_size(tokenizer), real_vocab(cfg)
    if n_tok > real:
        where = f" ({model_path})" if model_path is not None else ""
        tok_where = f" ({tokenizer_path})" if tokenizer_path is not None else ""
        rows = f"{real} real tokens of its {cfg.vocab_size} rows" if real != cfg.vocab_size else f"{real} tokens"
        raise LmstackError(f"{what + ': ' if what else ''}the tokenizer{tok_where} has {n_tok} tokens but the "
                           f"model{where} has {rows}; ids {real}..{n_tok - 1} would index past its embedding. "
                           + (hint or "Use the tokenizer the model was trained with, or a model with a vocabulary "
                              "at least as large as the tokenizer's"))
    return min(real, n_tok)


def padded_real_vocab_size(vocab_size: int, n_tokenizer: int, reserved: list[int] | tuple[int, ...] = ()) -> int | None:
    """real_vocab_size for a model of vocab_size rows trained with a tokenizer of n_tokenizer ids.

    reserved: ids an objective writes into the data past the tokenizer (MLM mask, span sentinels); they
    are real outputs, so the real range reaches past them. None when no row is padding."""
    real = max([n_tokenizer, *(i + 1 for i in reserved)])
    return real if real < vocab_size else None
