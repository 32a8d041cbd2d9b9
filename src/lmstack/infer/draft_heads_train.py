"""Training draft heads (draft_heads.py) on a frozen target: its own features and predictions are the teacher.

Each step takes `batch` windows of `seq_len` tokens from the training stream and runs the frozen target
once (features f after the final norm, and its distributions p = softmax(head(f))). Then:
- medusa: head i at position t is trained to give p_{t+i} (the target's distribution for token t+i+1),
  soft cross-entropy, heads weighted alike;
- eagle: the window is cut into chunks of `window + 8` positions (the proposal window plus room to roll);
  the layer reads (f_p, emb(x_{p+1})) and predicts f_{p+1}: smooth-L1 to the target's feature plus
  `cls_weight` x soft cross-entropy of head(f^) against p_{p+1} (the EAGLE paper's two losses). Input
  features get small uniform noise, as in EAGLE, so rolled (predicted) features are not out of distribution.
The target never changes (no grad, its parameters untouched); AdamW with warmup and cosine decay.

Usage:
    heads = DraftHeads(HeadsConfig("eagle", d_model=cfg.d_model, vocab_size=cfg.vocab_size))
    info = train_heads(heads, target, token_stream, steps=300)     # dict: steps, tokens, seconds, losses
    heads.save("runs/eagle_heads")
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.infer.draft_heads import DraftHeads


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * logits.float().log_softmax(-1)).sum(-1).mean()


def head_losses(heads: DraftHeads, target: nn.Module, ids: torch.Tensor, cls_weight: float = 0.1,
                noise: float = 0.05) -> tuple[torch.Tensor, dict]:
    """ids (B, T) -> (loss, parts) for one batch; the target runs frozen."""
    with torch.no_grad():
        feats = target(ids, return_hidden=True)
        probs = target.head(feats).float().softmax(-1)
    cfg = heads.config
    if cfg.method == "medusa":
        pred = target.head(heads.medusa(feats))  # (B, T, K, vocab)
        losses = [soft_ce(pred[:, : ids.shape[1] - i, i - 1], probs[:, i:]) for i in range(1, cfg.num_heads + 1)]
        return sum(losses) / len(losses), {f"head{i + 1}_ce": round(float(x.detach()), 4) for i, x in enumerate(losses)}
    chunk = min(cfg.window + 8, ids.shape[1] - 1)
    n = (ids.shape[1] - 1) // chunk * chunk
    f_in = feats[:, :n].reshape(-1, chunk, cfg.d_model)
    f_out = feats[:, 1:n + 1].reshape(-1, chunk, cfg.d_model)
    p_out = probs[:, 1:n + 1].reshape(-1, chunk, probs.shape[-1])
    with torch.no_grad():
        emb = target.tok_emb(ids[:, 1:n + 1]).reshape(-1, chunk, cfg.d_model)
    f_in = f_in + (torch.rand_like(f_in) - 0.5) * 2 * noise
    pred, _ = heads.eagle(f_in, emb)
    reg = F.smooth_l1_loss(pred, f_out)
    cls = soft_ce(target.head(pred), p_out)
    return reg + cls_weight * cls, {"feature_l1": round(float(reg.detach()), 4), "ce": round(float(cls.detach()), 4)}


def train_heads(heads: DraftHeads, target: nn.Module, data: torch.Tensor, steps: int = 300, batch: int = 8,
                seq_len: int = 160, lr: float = 3e-3, seed: int = 0, log_every: int = 50) -> dict:
    """Train heads in place on windows of the 1-D token stream `data`; returns what a results JSON states."""
    if len(data) <= seq_len + 1:
        raise LmstackError(f"draft heads training needs more than seq_len+1={seq_len + 1} tokens, got {len(data)}")
    target.eval()
    frozen = [p.requires_grad for p in target.parameters()]
    for p in target.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    heads.train()
    start, parts, losses = time.perf_counter(), {}, []
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            idx = torch.randint(0, len(data) - seq_len, (batch,), generator=g).tolist()
            ids = torch.stack([data[i:i + seq_len] for i in idx])
            loss, parts = head_losses(heads, target, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  heads step {step}/{steps} loss {losses[-1]:.3f} {parts} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    finally:
        for p, r in zip(target.parameters(), frozen):
            p.requires_grad_(r)
        heads.eval()
    tail = losses[-20:]
    return dict(method=heads.config.method, steps=steps, tokens=steps * batch * seq_len, batch=batch,
                seq_len=seq_len, lr=lr, train_seconds=round(time.perf_counter() - start),
                final_loss=round(sum(tail) / len(tail), 4), final_parts=parts,
                params=sum(p.numel() for p in heads.parameters()))
