"""ELECTRA replaced-token detection (Clark et al. 2020): a small generator plus a discriminator.

A small encoder (the generator) does masked LM on mask_prob of the positions (all of them shown as
the mask id). Its samples replace the masked tokens, and the main model (the discriminator, also an
encoder) says for every token whether it is original or replaced, through a binary head
(Linear(d_model, 1) on its hidden states) that lives here, in the objective. A sample that happens to
equal the original counts as original, as in the paper. The discriminator learns from every token,
not just the 15% that MLM scores, which is where ELECTRA's sample efficiency comes from.

    loss = generator MLM + electra_disc_weight * discriminator BCE        (weight 50 as in the paper)

Sampling is not differentiated (the generator learns only from its MLM loss). The random numbers the
sampler needs are drawn in prepare() (one uniform per position, used by inverse-CDF sampling), so
the whole step is deterministic given the trainer's generator. The generator and the head are
returned by parameters() so the trainer optimises them, and by state_dict() so checkpoints keep them.
The generator defaults to the discriminator's depth and half its heads (ELECTRA found generators of
1/4-1/2 the discriminator's size work best). Under DDP/FSDP the generator is not wrapped: its
gradients are per-rank unless the caller wraps it.

Usage:
    obj = Electra(ObjectiveConfig(name="electra"), ModelConfig(causal=False, ...))
    opt = torch.optim.AdamW(list(model.parameters()) + obj.parameters())
    loss, metrics = obj.loss(model, obj.prepare(tokens, g))   # metrics: gen_loss, disc_loss, disc_accuracy
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ConfigError
from lmstack.model.transformer import Transformer
from lmstack.train.objectives.base import Objective, model_inputs, scored_logits, seeded
from lmstack.train.objectives.mlm import choose_positions, eligible_positions


def generator_config(model_cfg, cfg):
    """The generator: an encoder with the same vocabulary and positions, narrower (and optionally shallower)."""
    if cfg.electra_gen_d_model:
        d = cfg.electra_gen_d_model
        heads = max(1, d // model_cfg.head_dim)
    else:
        heads = max(1, model_cfg.n_heads // 2)
        d = heads * model_cfg.head_dim
    if d % heads:
        raise ConfigError(f"objective.electra_gen_d_model={d} must be a multiple of the generator's {heads} heads")
    return model_cfg.replace(
        d_model=d, n_heads=heads, n_kv_heads=0, head_dim=0, d_ff=0, moe_d_ff=0,
        n_layers=cfg.electra_gen_layers or model_cfg.n_layers, n_experts=0, n_shared_experts=0, moe_layers=None,
        n_unique_layers=0, sliding_window=0, sliding_window_layers=None, sparse_pattern="none",
        attention="softmax", causal=False, head="lm", tie_embeddings=True, name=f"{model_cfg.name}-electra-generator")


def sample_inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One id per row of (N, V) logits: the first id whose cumulative probability reaches u (N,)."""
    cdf = torch.softmax(logits.float(), -1).cumsum(-1)
    return torch.searchsorted(cdf, u[:, None].to(cdf)).squeeze(1).clamp_max(logits.shape[-1] - 1)


class Electra(Objective):
    name = "electra"
    attention = "bidirectional"
    prefix_safe = False

    def __init__(self, cfg, model_cfg, pad_id: int | None = None):
        super().__init__(cfg, model_cfg, pad_id)
        self.reserved = [self.mask_id]
        with seeded(cfg.init_seed):
            self.extra["generator"] = Transformer(generator_config(model_cfg, cfg))
            self.extra["disc_head"] = nn.Linear(model_cfg.d_model, 1)

    @property
    def generator(self) -> Transformer:
        return self.extra["generator"]

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        original = tokens[:, :-1]
        valid = eligible_positions(original, self.pad_id, None)
        chosen = choose_positions(eligible_positions(original, self.pad_id, self.bos_id), self.cfg.mask_prob, generator)
        batch = {"input_ids": torch.where(chosen, torch.full_like(original, self.mask_id), original),
                 "targets": original, "loss_mask": chosen, "sample_u": torch.rand(original.shape, generator=generator)}
        if doc_ids is not None:
            batch["doc_ids"] = doc_ids
        if not bool(valid.all()):
            batch["attention_mask"] = valid
        return batch

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        self._place(batch["input_ids"])
        gen = self.generator
        gen.train(model.training)
        kw = model_inputs(batch)
        targets, chosen = batch["targets"], batch["loss_mask"]
        gen_logits = scored_logits(gen, batch["input_ids"], chosen, kw)   # (n_chosen, V)
        gen_loss, gen_metrics = self.lm_loss(gen_logits, targets[chosen], model.training)
        with torch.no_grad():
            disc_input = targets.clone()
            disc_input[chosen] = sample_inverse_cdf(gen_logits, batch["sample_u"][chosen])
        replaced = disc_input != targets
        valid = targets != self.pad_id if self.pad_id is not None else torch.ones_like(chosen)
        hidden = model(disc_input, return_hidden=True, **kw)
        score = self.extra["disc_head"](hidden).squeeze(-1).float()
        n = int(valid.sum())
        if n:
            disc_loss = F.binary_cross_entropy_with_logits(score[valid], replaced[valid].float())
            disc_acc = float(((score[valid] > 0) == replaced[valid]).float().mean())
        else:
            disc_loss, disc_acc = score.sum() * 0.0, 0.0
        loss = gen_loss + self.cfg.electra_disc_weight * disc_loss
        metrics = {"gen_loss": gen_metrics["ce"], "gen_accuracy": gen_metrics["accuracy"],
                   "disc_loss": float(disc_loss.detach()), "disc_accuracy": disc_acc,
                   "replaced_frac": float(replaced[valid].float().mean()) if n else 0.0, "n_tokens": n}
        return self.finish(model, loss, metrics, gen)
