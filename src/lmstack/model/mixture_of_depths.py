"""Mixture-of-Depths (Raposo et al. 2024): a routed block processes only the top-k tokens of each sequence.

A linear router scores every token; the k = capacity * T best of each sequence go through the block (attention
among the selected tokens only, in their original order and at their original positions for RoPE, then the
MLP), and the rest skip it through the residual. A selected token's update is scaled by its router weight,
so the router is trained by the language-model loss itself:

    x_i <- x_i + sigmoid(r_i) * (block(X_sel)_i - x_i)    if i is among the top k of its sequence, else x_i

(The paper scales by the raw score r_i; sigmoid keeps the scale in (0, 1) and starts it at 1/2, which also
makes sigmoid(r_i) the probability of the auxiliary loss below. `block(X) - X` is the block's residual update,
so every norm position works.)

Causality: top-k over a sequence looks at future tokens, which autoregressive sampling cannot. We use the
paper's auxiliary-loss method: binary cross-entropy between the router logit and the top-k choice
(weight mod_aux_loss_coef, added to model.aux_loss), so that sigmoid(r_i) > 1/2 predicts the choice from the
token alone. `routing = "threshold"` routes that way (causal; the count varies per row); "topk" (the default)
is the training rule.

Decoding with the contiguous KV cache (model.new_cache(), reference_decode, `lmstack model generate`) routes
by the predictor, since top-k over tokens not yet generated does not exist: a token enters a routed block when
sigmoid(r_i) > 1/2, and the routed layer keeps its own keys and values of the tokens it processed (per row,
beside the KVCache), so a skipped token costs that layer nothing, now or later. The result equals a full
forward with routing = "threshold". The paged engine refuses MoD models (its pool has one slot per token
and layer).

FLOPs: `mod_forward_flops(cfg)` gives forward FLOPs per token of the config with and without its routing,
arithmetic in counting.py's (Kaplan) convention.

Usage:
    cfg = ModelConfig(n_layers=4, mod_capacity=0.125)      # blocks 1 and 3 routed
    model = Transformer(cfg); logits = model(idx)
    loss = ce + model.aux_loss                              # includes the routers' BCE
    model.blocks[1].router.last_selected                   # (B, T) bool: the tokens block 1 processed
    mod_forward_flops(cfg)["ratio"]                         # MoD / dense forward FLOPs
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LmstackError
from lmstack.model.attention_cache import BackendCache
from lmstack.model.config import ModelConfig
from lmstack.model.counting import block_params, model_stats
from lmstack.model.kv_cache import KVCache
from lmstack.model.masks import AttentionMask

ROUTINGS = ("topk", "threshold")


class RoutedContext:
    """The ForwardContext a routed block sees: the selected tokens of each row, at their own positions.

    Rows select different positions, so the RoPE tables carry a batch axis; the mask is causal over the
    selected tokens' order, which is their position order (selection keeps the original order)."""

    def __init__(self, ctx, positions: torch.Tensor, cache: "RoutedLayerCache | None" = None):
        self.cfg, self.cache, self.slopes = ctx.cfg, cache, None
        self.has_batch_rules = False
        b, k = positions.shape
        self.q_pos = self.k_pos = torch.arange(k, device=positions.device)
        if cache is not None:  # decoding (one row): the keys are this layer's earlier tokens, by real position
            self.q_pos, self.k_pos = positions[0], torch.cat((cache.pos, positions[0]))
        self.cos_q = self.sin_q = self.cos_t = self.sin_t = None
        if ctx.cos_q is not None:
            cos, sin = ctx._rope(positions)              # (B, k, D)
            self.cos_q, self.sin_q = cos[:, None], sin[:, None]  # for q (B, H, k, D)
            self.cos_t, self.sin_t = cos[:, :, None], sin[:, :, None]  # for heads second to last (B, k, H, D)
        self._mask = AttentionMask(q_pos=self.q_pos, k_pos=self.k_pos, causal=ctx.cfg.causal)

    def mask(self, layer: int) -> AttentionMask:
        return self._mask


class RoutedLayerCache(BackendCache):
    """One row's keys and values in one routed layer while decoding: only the tokens that layer processed,
    with their positions (the causal mask compares real positions; keys are stored rotated)."""

    rotated_keys = True

    def __init__(self, device: torch.device):
        self.k = self.v = None
        self.pos = torch.zeros(0, dtype=torch.long, device=device)

    def positions(self, t: int):
        raise LmstackError("RoutedLayerCache belongs to one routed layer; the model's cache gives positions")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def advance(self, t: int) -> None:  # the router moves pos on, once the block has run
        pass


class MoDRouter(nn.Module):
    """The router of one routed block: a score per token, the selection, the gate and the auxiliary loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.capacity, self.aux_coef = cfg.mod_capacity, cfg.mod_aux_loss_coef
        self.score = nn.Linear(cfg.d_model, 1, bias=False)
        self.routing = "topk"  # or "threshold": the causal rule the auxiliary loss trains
        self.aux_loss = torch.zeros(())
        self.last_selected = torch.zeros(0, 0, dtype=torch.bool)
        # decoding: the model's KVCache -> this layer's per-row RoutedLayerCaches (gone with the cache)
        self._decode: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def k(self, t: int) -> int:
        """Tokens of a length-t sequence that the block processes under top-k."""
        return max(1, min(t, math.ceil(self.capacity * t)))

    def forward(self, block: Callable, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        """Run `block(xs, ctx, layer)` (the dense block's forward) on the selected tokens of x (B, T, D)."""
        if ctx.has_batch_rules:
            raise LmstackError("mod_capacity (Mixture-of-Depths) takes no doc_ids, attention_mask or prefix_len")
        if self.routing not in ROUTINGS:
            raise LmstackError(f"unknown Mixture-of-Depths routing {self.routing!r}; choose one of {ROUTINGS}")
        if ctx.cache is not None:
            return self._decode_step(block, x, ctx, layer)
        b, t, _ = x.shape
        logits = self.score(x).squeeze(-1).float()  # (B, T)
        if self.routing == "topk":
            chosen = logits.topk(self.k(t), dim=-1).indices.sort(dim=-1).values
            selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)
        else:
            selected = logits > 0
        # the auxiliary predictor's loss: the score alone (causal) should say whether top-k picks the token
        self.aux_loss = logits.new_zeros(())
        if self.aux_coef and self.routing == "topk":
            self.aux_loss = self.aux_coef * F.binary_cross_entropy_with_logits(logits, selected.float())
        self.last_selected = selected.detach()
        gate = torch.sigmoid(logits).to(x.dtype)
        if self.routing == "topk":
            return self._apply(block, x, ctx, layer, chosen, gate)
        rows = []
        for row in range(b):  # each row keeps its own count of tokens
            idx = selected[row].nonzero().squeeze(-1)[None]
            one = x[row:row + 1]
            rows.append(self._apply(block, one, ctx, layer, idx, gate[row:row + 1]) if idx.numel() else one)
        return torch.cat(rows)

    def _decode_step(self, block: Callable, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        """Prefill or a decode step with the model's KVCache: the causal predictor routes, and each row's
        selected tokens attend over the tokens this layer processed before (RoutedLayerCache)."""
        if not isinstance(ctx.cache, KVCache):
            raise LmstackError(f"mod_capacity (Mixture-of-Depths) decodes with the contiguous KV cache "
                               f"(model.new_cache()), not a {type(ctx.cache).__name__}")
        rows = self._decode.get(ctx.cache)
        if rows is None:
            rows = self._decode[ctx.cache] = [RoutedLayerCache(x.device) for _ in range(x.shape[0])]
        if len(rows) != x.shape[0]:
            raise LmstackError(f"this KV cache was started with batch size {len(rows)}, not {x.shape[0]}")
        logits = self.score(x).squeeze(-1).float()
        selected = logits > 0
        self.aux_loss = logits.new_zeros(())
        self.last_selected = selected.detach()
        gate = torch.sigmoid(logits).to(x.dtype)
        out = []
        for row, store in enumerate(rows):
            idx = selected[row].nonzero().squeeze(-1)
            one = x[row:row + 1]
            if not idx.numel():
                out.append(one)
                continue
            pos = ctx.q_pos[idx][None]
            xs = one[:, idx]
            ys = block(xs, RoutedContext(ctx, pos, cache=store), layer)
            store.pos = torch.cat((store.pos, pos[0]))
            one = one.clone()
            one[:, idx] = xs + gate[row, idx][None, :, None] * (ys - xs)
            out.append(one)
        return torch.cat(out)

    @staticmethod
    def _apply(block: Callable, x, ctx, layer: int, idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x with the tokens at idx (B, k, in position order) replaced by their gated pass through the block."""
        where = idx[..., None].expand(-1, -1, x.shape[-1])
        xs = x.gather(1, where)
        ys = block(xs, RoutedContext(ctx, ctx.q_pos[idx]), layer)
        return x.scatter(1, where, xs + gate.gather(1, idx)[..., None] * (ys - xs))


def mod_forward_flops(cfg: ModelConfig, context: int | None = None) -> dict:
    """Forward FLOPs per token of cfg with its Mixture-of-Depths routing and of the same config dense.

    Arithmetic, in counting.model_stats' convention (2 FLOPs per weight per token; attention 4 * context *
    n_heads * head_dim per token per layer). A routed layer runs its weights on a capacity fraction of the
    tokens and its attention over a capacity fraction of the keys, so its attention costs capacity^2 of the
    dense layer's; its router costs 2 * d_model per token."""
    context = context or cfg.max_seq_len
    dense_cfg = cfg.replace(mod_capacity=0.0, mod_layers=None)
    dense = model_stats(dense_cfg, context).forward_flops_per_token
    c = cfg.mod_capacity
    unique = cfg.n_unique_layers or cfg.n_layers
    routed = [layer for layer in range(cfg.n_layers) if cfg.is_mod_layer(layer % unique)]
    attn = 4 * context * cfg.n_heads * cfg.head_dim
    saved = sum((1 - c) * 2 * block_params(dense_cfg, layer % unique)[1] + (1 - c * c) * attn - 2 * cfg.d_model
                for layer in routed)
    mod = dense - saved
    return {"method": "arithmetic (counting.model_stats convention)", "context": context, "capacity": c,
            "routed_layers": routed, "dense_forward_flops_per_token": float(dense),
            "mod_forward_flops_per_token": float(mod), "ratio": float(mod / dense)}
