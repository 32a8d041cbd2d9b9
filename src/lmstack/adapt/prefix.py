"""Prefix tuning (Li & Liang 2021): learned key/value prefixes at every layer, the base model frozen.

Each layer's attention sees P extra keys and values in front of the real ones. Queries attend to
them with no causal mask against them, so every real token can read the prefix. This is exactly
what a KV cache that already holds P tokens does, and that is how it is built: a forward pre-hook
on the model wraps the `cache` argument (None, or a KVCache while decoding) in a `PrefixCache`
that shifts the real positions by P and puts the prefix K/V in front of the layer's keys. Decoding
with a KV cache works the same way. (With a sliding-window model the prefix sits at positions
0..P-1, so queries further than the window stop seeing it, as with PEFT's past_key_values.)

Two parameterisations (cfg.prefix_projection):
- direct: one tensor (n_layers, 2, n_kv_heads, P, head_dim). It starts as the keys and values the
  frozen model itself computes for P random vocabulary tokens, so the adapted model starts out
  like the base model reading a few real tokens, not like one reading noise (Li & Liang, sec. 7).
- projection: an embedding (P, d_model) fed through an MLP d_model -> prefix_hidden -> all layers'
  K/V; the paper's reparameterisation, which trains more stably.

Packed rows (doc_ids) work: the prefix keys carry doc id -1, which every document sees (the one
model-side addition this needed, in model/masks.py). Packing is not exact for prefixes, though: a
later document in a row sits further from the prefix than it would alone, which changes its RoPE
angle to the prefix keys; pack with strategy "none" when that matters.

Prefix K/V count as already rotated by RoPE (the cache stores rotated keys), as in PEFT's
past_key_values. A prefix is not a no-op at init: the extra keys take some attention mass.

Usage:
    from lmstack.adapt import AdapterConfig, get_peft_model
    model = get_peft_model(model, AdapterConfig(method="prefix", num_virtual_tokens=8))
    logits = model(idx)                    # (B, T, vocab) for the real tokens
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.adapt.hooks import Switchable, ensure_sync
from lmstack.adapt.registry import register_method
from lmstack.errors import LmstackError
from lmstack.model.attention_cache import BackendCache
from lmstack.model.counting import kv_values_per_token


class CaptureCache(BackendCache):
    """A cache for one plain forward pass that keeps every layer's (rotated) K and V."""

    rotated_keys = True

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(t)
        return pos, pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, t: int) -> None:
        pass


class PrefixCache(BackendCache):
    """Puts per-layer prefix K/V (each (1 or B, Hkv, P, D)) in front of the keys; wraps an optional inner cache.

    Real tokens get positions P, P+1, ...; the prefix sits at 0..P-1, so a causal mask already lets
    every query see all of it."""

    rotated_keys = True

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], inner=None):
        if inner is not None and (not isinstance(inner, BackendCache) or not inner.rotated_keys or inner.window):
            raise LmstackError(f"prefix/prompt tuning runs with no cache or a contiguous KVCache, not "
                               f"{type(inner).__name__}; merge-free serving of prefixes is not supported")
        self.k, self.v, self.inner = k, v, inner
        self.n_prefix = k[0].shape[2]

    def positions(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.n_prefix
        if self.inner is None:
            return torch.arange(p, p + t), torch.arange(p + t)
        q_pos, k_pos = self.inner.positions(t)
        return q_pos + p, torch.cat((torch.arange(p, device=k_pos.device), k_pos + p))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        b = k.shape[0]
        pk = self.k[layer].to(k.dtype).expand(b, -1, -1, -1)
        pv = self.v[layer].to(v.dtype).expand(b, -1, -1, -1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)

    def advance(self, t: int) -> None:
        if self.inner is not None:
            self.inner.advance(t)

    def key_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """Packed rows: the prefix keys get doc id -1, which every document of the row sees."""
        return torch.cat((doc_ids.new_full((doc_ids.shape[0], self.n_prefix), -1), doc_ids), dim=1)


def wrap_forward_inputs(args: tuple, kwargs: dict, k: list[torch.Tensor], v: list[torch.Tensor]) -> tuple:
    """Rewrite the Transformer.forward arguments so the call sees P prefix positions first."""
    kwargs = dict(kwargs)
    if len(args) > 1:  # cache passed positionally: forward(idx, cache)
        kwargs["cache"], args = args[1], args[:1]
    if kwargs.get("doc_ids") is not None and kwargs.get("cache") is not None:
        raise LmstackError("prefix/prompt tuning takes doc_ids (packed rows) only without a KV cache")
    p = k[0].shape[2]
    kwargs["cache"] = PrefixCache(k, v, kwargs.get("cache"))
    mask = kwargs.get("attention_mask")
    if mask is not None:  # the prefix keys are always real, never padding
        kwargs["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], p), mask), dim=1)
    if kwargs.get("prefix_len") is not None:  # prefix-LM boundaries move with the shifted positions
        kwargs["prefix_len"] = kwargs["prefix_len"] + p
    return args, kwargs


def capture_kv(model: nn.Module, idx: torch.Tensor) -> CaptureCache:
    """Run `model` on idx (B, T) and return every layer's K/V (what a KV cache would hold)."""
    cache = CaptureCache()
    model(idx, cache=cache)
    return cache


class PrefixEncoder(nn.Module):
    """The learned prefix of one adapter; forward() -> (n_layers, 2, n_kv_heads, P, head_dim)."""

    def __init__(self, mcfg, n_tokens: int, projection: bool, hidden: int, init_kv: torch.Tensor | None = None):
        super().__init__()
        self.shape = (mcfg.n_layers, 2, mcfg.n_kv_heads, n_tokens, mcfg.head_dim)
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(n_tokens, mcfg.d_model)
            flat = kv_values_per_token(mcfg)
            self.mlp = nn.Sequential(nn.Linear(mcfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, flat))
        else:
            self.kv = nn.Parameter(init_kv.clone() if init_kv is not None else torch.randn(self.shape) * 0.02)

    def forward(self) -> torch.Tensor:
        if not self.projection:
            return self.kv
        n_layers, _, hkv, p, d = self.shape
        flat = self.mlp(self.embedding.weight)  # (P, L*2*Hkv*D)
        return flat.view(p, n_layers, 2, hkv, d).permute(1, 2, 3, 0, 4)


class PrefixTuning(Switchable):
    """All prefix adapters of a model (`model.prefix_tuning`), keyed by adapter name; several acting
    prefixes are concatenated along the prefix axis."""

    store_name = "encoders"

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict()

    def prefix_kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        names = self.acting()
        if not names:
            return None
        kv = torch.cat([self.encoders[n]() for n in names], dim=3)  # (L, 2, Hkv, P, D)
        return [kv[i, 0][None] for i in range(kv.shape[0])], [kv[i, 1][None] for i in range(kv.shape[0])]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        kv = self.prefix_kv()
        if kv is None:
            return None
        return wrap_forward_inputs(args, kwargs, *kv)


def count_prefix_params(mcfg, cfg) -> int:
    """Trainable parameters one prefix adapter adds (for reports and tests)."""
    kv = kv_values_per_token(mcfg)
    if not cfg.prefix_projection:
        return kv * cfg.num_virtual_tokens
    h = cfg.prefix_hidden
    return cfg.num_virtual_tokens * mcfg.d_model + mcfg.d_model * h + h + h * kv + kv


@register_method("prefix")
def add_prefix(model: nn.Module, cfg, adapter_name: str) -> None:
    """Add a learned K/V prefix of cfg.num_virtual_tokens positions to every layer of `model`."""
    mcfg = getattr(model, "config", None)
    if mcfg is None or not hasattr(model, "blocks"):
        raise LmstackError("prefix tuning needs an lmstack Transformer (with .config and .blocks)")
    if mcfg.attention != "softmax":
        raise LmstackError(f"prefix tuning needs softmax attention, the model uses attention={mcfg.attention!r}")
    container = getattr(model, "prefix_tuning", None)
    if container is None:
        ensure_sync(model)
        container = PrefixTuning()
        model.prefix_tuning = container
        model.register_forward_pre_hook(container.pre_hook, with_kwargs=True)
    ref = next(model.parameters())
    init_kv = None
    if not cfg.prefix_projection:
        # Start from what the frozen model computes for random real tokens, with every other prefix off.
        g = torch.Generator().manual_seed(len(container.encoders))
        ids = torch.randint(0, mcfg.vocab_size, (1, cfg.num_virtual_tokens), generator=g).to(ref.device)
        was_disabled, was_training = container.disabled, model.training
        container.disabled = True
        model.eval()
        try:
            with torch.no_grad():
                cache = capture_kv(model, ids)
        finally:
            container.disabled = was_disabled
            model.train(was_training)
        init_kv = torch.stack([torch.stack((cache.k[i][0], cache.v[i][0])) for i in range(mcfg.n_layers)])
    enc = PrefixEncoder(mcfg, cfg.num_virtual_tokens, cfg.prefix_projection, cfg.prefix_hidden, init_kv)
    container.encoders[adapter_name] = enc.to(device=ref.device, dtype=ref.dtype)
