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

Dispatch is grouped (as in MegaBlocks / vLLM's fused MoE, here in plain torch): the N*top_k routing
slots are sorted by expert id (stable, so each expert sees its tokens in order), the tokens are
gathered once into that order, and each expert runs ONE matmul pair over its contiguous slice; the
results are weighted and scattered back with one index_add. The engine runs the same module, so
decoding and prefill dispatch the same way. `dispatch = "loop"` runs the per-token reference instead
(every token, every chosen expert, one small matmul each): tests hold grouped == loop, and
benchmarks/moe_dispatch.py times both.

Capacity (moe_capacity_factor > 0, Switch Transformer): expert e keeps at most
ceil(factor * N * top_k / E) of its slots, the earliest tokens first; the rest are dropped (their
contribution is zero, the token keeps its residual) and counted in `last_dropped`. The aux loss still
sees every routing decision.

Usage:
    moe = MoE(cfg)
    y = moe(x); loss = loss + moe.aux_loss
    moe.last_counts, moe.last_dropped      # slots routed to each expert, slots dropped by capacity
"""
from __future__ import annotations

import math

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
        self.capacity_factor = cfg.moe_capacity_factor
        self.dispatch = "grouped"  # or "loop": the per-token reference (tests, benchmarks)
        self.aux_loss = torch.zeros(())
        self.last_counts = torch.zeros(cfg.n_experts, dtype=torch.long)
        self.last_dropped = 0

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

    def capacity(self, n_tokens: int) -> int | None:
        """Slots each expert keeps for a forward over n_tokens tokens (None: unlimited)."""
        if not self.capacity_factor:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, experts = self.route(x)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)
        if self.dispatch == "loop":
            out, dropped = self._loop(x, weights, experts, counts)
        else:
            out, dropped = self._grouped(x, weights, experts, counts)
        if self.shared is not None:
            out = out + self.shared(x)
        self.last_counts, self.last_dropped = counts.detach(), dropped
        self.aux_loss = self._aux_loss(logits, counts)
        return out.view(shape)

    def _kept_slots(self, experts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Routing slots (flat indices into (N, k)) sorted by expert, capacity applied; per-expert kept counts."""
        order = torch.argsort(experts.flatten(), stable=True)
        cap = self.capacity(experts.shape[0])
        if cap is None or int(counts.max()) <= cap:
            return order, counts, 0
        # rank of each sorted slot within its expert's group: position - start of the group
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(counts)
        kept = counts.clamp(max=cap)
        return order[rank < cap], kept, int((counts - kept).sum())

    def _grouped(self, x, weights, experts, counts) -> tuple[torch.Tensor, int]:
        slots, kept, dropped = self._kept_slots(experts, counts)
        token = slots // self.top_k
        xs = x[token]  # one gather: every expert's tokens contiguous, in expert order
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(kept.tolist()):
            if n:  # one matmul pair per expert over its slice
                ys[start:start + n] = self.expert(e, xs[start:start + n])
                start += n
        ys = ys * weights.flatten()[slots, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, ys)
        return out, dropped

    def _loop(self, x, weights, experts, counts) -> tuple[torch.Tensor, int]:
        """Reference: each token, each of its top_k experts, one (1, D) matmul; capacity in token order."""
        cap = self.capacity(x.shape[0])
        used = [0] * self.n_experts
        rows, dropped = [], 0
        for t in range(x.shape[0]):
            y = torch.zeros_like(x[t])
            for s in range(self.top_k):
                e = int(experts[t, s])
                if cap is not None and used[e] >= cap:
                    dropped += 1
                    continue
                used[e] += 1
                y = y + self.expert(e, x[t:t + 1])[0] * weights[t, s].to(x.dtype)
            rows.append(y)
        return torch.stack(rows) if rows else torch.zeros_like(x), dropped

    def _aux_loss(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.aux_coef:
            frac = counts.float() / counts.sum()
            mean_prob = logits.softmax(dim=-1).mean(dim=0)
            loss = loss + self.aux_coef * self.n_experts * (frac * mean_prob).sum()
        if self.z_coef:
            loss = loss + self.z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss
