"""Prompt tuning (Lester et al. 2021): P learned input embeddings in front of every sequence.

Only the soft prompt trains. `model(idx)` still returns logits (B, T, vocab) for the real tokens,
so the loss code does not change. How, without editing the model: in a causal model the soft
prompt's hidden states never depend on the tokens after it, so running [prompt; tokens] in one
pass equals running the prompt alone first (batch 1, into a cache that keeps its K/V), then the
tokens with that cache in front -- the same trick as prefix tuning (prefix.PrefixCache), except
that the prefix K/V are computed by the model from the learned embeddings at every forward, so the
gradient reaches the embeddings through all layers. The prompt pass costs P tokens at batch 1.

The prompt starts as the embeddings of P random vocabulary tokens (Lester et al.'s "sampled
vocab" init), which works better than random vectors. Bidirectional models are refused: there the
prompt would also attend to the tokens, which the two-pass trick cannot reproduce.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="prompt", num_virtual_tokens=8))
    logits = model(idx)                                   # (B, T, vocab)
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.prefix import CaptureCache, wrap_forward_inputs
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError


class PromptTuning(Switchable):
    """All soft prompts of a model (`model.prompt_tuning`), keyed by adapter name; acting ones are concatenated."""

    store_name = "prompts"

    def __init__(self):
        super().__init__()
        self.prompts = nn.ParameterDict()
        self._feeding: torch.Tensor | None = None  # set while the prompt pass runs

    def soft_prompt(self) -> torch.Tensor | None:
        """(P, d_model): the acting prompts, concatenated; None when off."""
        names = self.acting()
        if not names:
            return None
        return torch.cat([self.prompts[n] for n in names], dim=0)

    def embedding_hook(self, module: nn.Module, args: tuple, out: torch.Tensor):
        # During the prompt pass the token embedding layer hands out the soft prompt instead.
        return self._feeding if self._feeding is not None else None

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        if self._feeding is not None:
            return None  # the inner prompt pass itself
        prompt = self.soft_prompt()
        if prompt is None:
            return None
        idx = args[0] if args else kwargs["idx"]
        cache = CaptureCache()
        self._feeding = prompt[None]
        try:
            dummy = torch.zeros(1, prompt.shape[0], dtype=torch.long, device=idx.device)
            model(dummy, cache=cache)
        finally:
            self._feeding = None
        n = model.config.n_layers
        return wrap_forward_inputs(args, kwargs, [cache.k[i] for i in range(n)], [cache.v[i] for i in range(n)])


@register_method("prompt")
def add_prompt(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a soft prompt of cfg.num_virtual_tokens embeddings in front of every input of `model`."""
    mcfg = getattr(model, "config", None)
    if mcfg is None or not hasattr(model, "tok_emb"):
        raise LmstackError("prompt tuning needs an lmstack Transformer (with .config and .tok_emb)")
    if not mcfg.causal or mcfg.attention != "softmax":
        raise LmstackError("prompt tuning needs a causal softmax-attention model (causal=True, attention='softmax'); "
                           f"this one has causal={mcfg.causal}, attention={mcfg.attention!r}")
    container = getattr(model, "prompt_tuning", None)
    if container is None:
        ensure_sync(model)
        container = PromptTuning()
        model.prompt_tuning = container
        model.tok_emb.register_forward_hook(container.embedding_hook)
        model.register_forward_pre_hook(container.pre_hook, with_kwargs=True)
    g = torch.Generator().manual_seed(1000 + len(container.prompts))
    ids = torch.randint(0, mcfg.vocab_size, (cfg.num_virtual_tokens,), generator=g)
    init = model.tok_emb.weight.detach()[ids.to(model.tok_emb.weight.device)].clone()
    container.prompts[adapter_name] = nn.Parameter(init)
