"""Contrastive pretraining as an auxiliary InfoNCE loss on top of any causal or prefix-LM objective.

In the spirit of CPC (van den Oord et al. 2018): a context summarised by the model must pick out
its own future among distractors. For every row the prefix (positions before prefix_len, or before
contrastive_split * T when the objective has no prefix) is summarised by the mean of the model's
final hidden states there; the continuation (the rest of the row, up to its length) by the mean of
its token embeddings. Using non-contextual embeddings for the continuation matters: the model's own
hidden states at continuation positions have already read the prefix, which would make the match
trivial. Both summaries go through small projection heads and are L2-normalised; the prefix must
rank its true continuation first among
- the continuations of the other rows in the batch, and
- corrupted continuations: each row's continuation with contrastive_corrupt of its tokens swapped
  for another row's tokens at the same positions (hard negatives that share most of the content),
with loss = cross-entropy over cosine similarities / contrastive_temperature. With doc_ids, both
regions are restricted to the document of the last prefix token. The total loss is the inner
objective's plus contrastive_weight times this one.

The states are read with forward hooks on the model's token embedding and final norm (or last
block), so the model runs once and the add-on works with any objective that calls it. Encoders
(mlm, electra) are refused: their prefix states see the continuation.

Usage:
    obj = build_objective(ObjectiveConfig(name="clm", contrastive_weight=0.1), model_cfg)
    loss, metrics = obj.loss(model, obj.prepare(tokens, g))   # metrics: contrastive_loss, contrastive_acc
    info_nce(q, k, temperature=0.1)                           # the loss alone: q[i] should match k[i]
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.train.objectives.base import seeded, unwrap


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, valid_q: torch.Tensor | None = None,
             valid_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE where query i's positive is key i and every other valid key is a negative.

    queries (B, D), keys (K >= B, D). Returns (mean loss over valid queries, top-1 accuracy); 0 when no
    query is valid."""
    b = queries.shape[0]
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / temperature
    if valid_k is not None:
        logits = logits.masked_fill(~valid_k[None, :], float("-inf"))
    rows = torch.ones(b, dtype=torch.bool, device=queries.device) if valid_q is None else valid_q
    if not bool(rows.any()):
        # zero, but attached to both inputs so every parameter still gets a (zero) gradient
        return (queries.sum() + keys.sum()).float() * 0.0, logits.new_zeros(())
    target = torch.arange(b, device=queries.device)
    loss = F.cross_entropy(logits[rows], target[rows])
    acc = (logits[rows].argmax(-1) == target[rows]).float().mean()
    return loss, acc


@contextlib.contextmanager
def capture_states(raw: nn.Module):
    """Record the token embeddings and the final hidden states of the next forward of `raw`."""
    seen: dict[str, torch.Tensor] = {}
    final = raw.final_norm if getattr(raw, "final_norm", None) is not None else \
        raw.blocks[(raw.config.n_layers - 1) % len(raw.blocks)]
    handles = [raw.tok_emb.register_forward_hook(lambda m, i, o: seen.__setitem__("embeds", o)),
               final.register_forward_hook(lambda m, i, o: seen.__setitem__("hidden", o))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def regions(batch: dict[str, Any], split_frac: float, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix mask, continuation mask), both (B, T) bool."""
    ids = batch["input_ids"]
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)[None]
    if batch.get("prefix_len") is not None:
        split = batch["prefix_len"].to(ids.device)
    else:
        split = torch.full((b,), min(max(round(split_frac * t), 1), t - 1), device=ids.device)
    lengths = batch.get("lengths")
    lengths = torch.full((b,), t, device=ids.device) if lengths is None else lengths.to(ids.device)
    prefix = pos < split[:, None]
    cont = (pos >= split[:, None]) & (pos < lengths[:, None])
    doc = batch.get("doc_ids")
    if doc is not None:
        anchor = doc.gather(1, (split - 1).clamp_min(0)[:, None])
        prefix, cont = prefix & (doc == anchor), cont & (doc == anchor)
    if pad_id is not None:
        prefix, cont = prefix & (ids != pad_id), cont & (ids != pad_id)
    return prefix, cont


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class Contrastive:
    """Wraps an objective and adds contrastive_weight * InfoNCE(prefix state, continuation) to its loss."""

    def __init__(self, inner, cfg, model_cfg):
        if not inner.prefix_safe:
            raise ConfigError(f"objective.contrastive_weight > 0 needs a causal or prefix-LM objective; "
                              f"{inner.name!r} runs a bidirectional encoder whose prefix states already see the "
                              "continuation")
        self.inner, self.cfg, self.name = inner, cfg, inner.name
        self.pad_id = inner.pad_id
        with seeded(cfg.init_seed + 1):
            self.heads = nn.ModuleDict({"query": nn.Linear(model_cfg.d_model, cfg.contrastive_dim),
                                        "key": nn.Linear(model_cfg.d_model, cfg.contrastive_dim)})

    def prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                doc_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch = self.inner.prepare(tokens, generator, doc_ids=doc_ids)
        batch["contrastive_u"] = torch.rand(batch["input_ids"].shape, generator=generator)
        return batch

    def contrastive_loss(self, hidden: torch.Tensor, embeds: torch.Tensor,
                         batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        prefix, cont = regions(batch, self.cfg.contrastive_split, self.pad_id)
        valid = prefix.any(1) & cont.any(1)
        b = hidden.shape[0]
        queries = self.heads["query"](_mean(hidden, prefix))
        keys = [self.heads["key"](_mean(embeds, cont))]
        valid_k = [valid]
        if self.cfg.contrastive_corrupt > 0 and b >= 2:
            other = embeds.roll(1, dims=0)  # row i borrows row i-1's tokens at the same positions
            swap = (batch["contrastive_u"].to(hidden.device) < self.cfg.contrastive_corrupt)[..., None]
            keys.append(self.heads["key"](_mean(torch.where(swap, other, embeds), cont)))
            valid_k.append(valid)
        loss, acc = info_nce(queries, torch.cat(keys), self.cfg.contrastive_temperature, valid, torch.cat(valid_k))
        return loss, {"contrastive_loss": float(loss.detach()), "contrastive_acc": float(acc)}

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raw = unwrap(model)
        self._place(batch["input_ids"])
        with capture_states(raw) as seen:
            loss, metrics = self.inner.loss(model, batch)
        if "hidden" not in seen or "embeds" not in seen:
            raise LmstackError("the contrastive loss could not read the model's hidden states; it needs an "
                               "lmstack Transformer (possibly wrapped by DDP/FSDP)")
        c_loss, c_metrics = self.contrastive_loss(seen["hidden"], seen["embeds"], batch)
        loss = loss + self.cfg.contrastive_weight * c_loss
        metrics.update(c_metrics)
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    # ---- the rest of the Objective interface, delegated
    def _place(self, like: torch.Tensor) -> None:
        if self.heads["query"].weight.device != like.device:
            self.heads.to(like.device)

    def parameters(self) -> list[nn.Parameter]:
        return self.inner.parameters() + list(self.heads.parameters())

    def to(self, device) -> "Contrastive":
        self.inner.to(device)
        self.heads.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"contrastive.{k}": v for k, v in self.heads.state_dict().items()}
        state.update(self.inner.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = {k[len("contrastive."):]: v for k, v in state.items() if k.startswith("contrastive.")}
        try:
            self.heads.load_state_dict(mine, strict=True)
        except RuntimeError as e:
            raise LmstackError(f"contrastive heads: saved state does not fit: {e}") from None
        self.inner.load_state_dict({k: v for k, v in state.items() if not k.startswith("contrastive.")})
