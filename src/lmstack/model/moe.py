"""Sparse mixture of experts: a top-k router over E expert MLPs, plus optional shared experts.

Each token is sent to its top_k experts (Shazeer et al. 2017; Mixtral); only those experts run on
it, so a layer with E experts of width F costs about top_k/E of a dense layer with E*F width.
The router's probabilities are renormalised over the chosen experts (Mixtral) unless
moe_renormalize is off. Shared experts (DeepSeekMoE, Qwen-MoE) see every token.

Two auxiliary losses keep routing healthy; the layer leaves their weighted sum in `self.aux_loss`
after each forward, and the model adds them up:
- load balancing (Switch Transformer): E * sum_i f_i * P_i, where f_i is the fraction of routing
  slots that went to expert i and P_i its mean router probability. It equals 1 for uniform routing.
- z-loss (ST-MoE): mean(logsumexp(router logits)^2), which keeps logits small.

Expert weights are stored stacked, (E, 2F or F, D) and (E, D, F), the layout transformers v5 uses.

Usage:
    moe = MoE(cfg)
    y = moe(x); loss = loss + moe.aux_loss
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.mlp import ACTIVATIONS, MLP


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.renormalize = cfg.moe_renormalize
        self.aux_coef, self.z_coef = cfg.router_aux_loss_coef, cfg.router_z_loss_coef
        self.gated = cfg.gated
        self.act = ACTIVATIONS[cfg.mlp]
        d, f = cfg.d_model, cfg.moe_d_ff
        self.router = nn.Linear(d, cfg.n_experts, bias=False)
        # gate and up projections stacked along dim 1 for gated MLPs: [gate; up]
        self.w_in = nn.Parameter(torch.empty(cfg.n_experts, 2 * f if cfg.gated else f, d))
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, d, f))
        self.shared = MLP(cfg, d_ff=f * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.aux_loss = torch.zeros(())
        self.last_counts = torch.zeros(cfg.n_experts, dtype=torch.long)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, E), top-k weights (N, k), top-k expert ids (N, k)) for tokens x (N, D)."""
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.w_in[e])
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return F.linear(h, self.w_out[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, experts = self.route(x)
        out = torch.zeros_like(x)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)
        # Only experts that received tokens run, each on just its tokens.
        for e in counts.nonzero().flatten().tolist():
            token, slot = torch.where(experts == e)
            y = self.expert(e, x[token]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        self.last_counts = counts.detach()
        self.aux_loss = self._aux_loss(logits, counts)
        return out.view(shape)

    def _aux_loss(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.aux_coef:
            frac = counts.float() / counts.sum()
            mean_prob = logits.softmax(dim=-1).mean(dim=0)
            loss = loss + self.aux_coef * self.n_experts * (frac * mean_prob).sum()
        if self.z_coef:
            loss = loss + self.z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss
