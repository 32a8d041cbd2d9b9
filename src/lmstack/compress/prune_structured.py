"""Structured pruning: remove whole attention heads, MLP channels or Transformer blocks, so every matrix that
remains is smaller and a dense matmul does less work. (Unstructured and 2:4 zeros, prune.py, leave the shapes as
they were; on a CPU they save nothing.) The result is a new Transformer with a smaller ModelConfig.

What is removed is chosen by importance scores from one forward pass over calibration token ids (checked as
calibration.collect_stats checks them):

- heads: the mean squared norm of what a head adds to the residual stream, tr(W_o,h X_h^T X_h W_o,h^T) / n,
  where X_h are the head's attention outputs (o_proj's input columns of that head) and W_o,h its o_proj columns:
  exact, from the per-head blocks of o_proj's input Gram matrix. ModelConfig holds one n_heads and one n_kv_heads for all layers, and query head h
  reads K/V head h // g (g = n_heads / n_kv_heads), so every layer keeps the same number of K/V groups and the
  same number of query heads in each kept group. For MHA (g = 1) that is just "keep k heads"; for GQA the kept
  shape (groups, queries per group) is the one whose head count is nearest the target (see head_shape), and the
  achievable fractions are coarse (a 4-head, 2-group model can only drop to 2 heads: 50%). A group's score is the
  sum of the query scores it keeps; head_dim stays fixed (head_dim is a config field, set explicitly).
- channels: ||W_down[:, j]||^2 * mean(a_j^2), with a_j the j-th input of down_proj (act(gate) * up), i.e. the
  mean squared size of channel j's contribution to the output. The same count is kept in every layer, rounded to
  a multiple of CHANNEL_MULTIPLE so matmul kernels keep their vector-width tiles.
- layers: ShortGPT's block influence (Men et al. 2024), 1 - mean over tokens of cos(block input, block output),
  measured once on the whole model; the blocks whose output is most like their input are dropped.

Counts (halves round up): heads and channels keep round((1 - sparsity) * n) (at least one removed, at least one kept); layers drop
round(sparsity * n_layers) (at least one, never all). What was actually removed is in the returned report.

Usage:
    from lmstack.compress.prune_structured import prune_structured
    small, report = prune_structured(model, "heads", 0.3, calib_ids)     # calib_ids: (N, T) token ids
    small, report = prune_structured(model, "channels", 0.3, calib_ids)
    small, report = prune_structured(model, "layers", 0.25, calib_ids)
    report["kept"], report["removed_fraction"], report["params_before"], report["params_after"]
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lmstack.compress.calibration import MIN_TOKENS, _sequences, collect_stats
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer

KINDS = ("heads", "channels", "layers")
CHANNEL_MULTIPLE = 8  # the fp32 AVX2 vector width; kept d_ff is rounded to it when d_ff allows


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 < sparsity < 1.0):
        raise LmstackError(f"sparsity must lie strictly between 0 and 1 (the fraction to remove); got {sparsity!r}")


def _unfused(model: Transformer) -> Transformer:
    """The model with separate q/k/v and gate/up Linears (a copy when it was fused), which slicing expects."""
    if not isinstance(model, Transformer):
        raise LmstackError(f"structured pruning needs an lmstack Transformer; got {type(model).__name__}")
    if model.config.fused_projections:
        return copy.deepcopy(model).unfuse_projections()
    return model


def _rebuild(model: Transformer, cfg, state: dict[str, torch.Tensor], fused: bool) -> Transformer:
    """A new Transformer for cfg holding `state` (split layout; every key checked: strict), fused if `fused`."""
    p = next(model.parameters())
    new = Transformer(cfg.replace(fused_projections=False)).to(dtype=p.dtype, device=p.device)
    new.load_state_dict(state, strict=True)
    if fused:
        new.fuse_projections()
    return new.train(model.training)


# ---------------------------------------------------------------- heads

def head_shape(n_heads: int, n_kv_heads: int, sparsity: float) -> tuple[int, int]:
    """(K/V groups kept, query heads kept per group) whose product is nearest (1 - sparsity) * n_heads, among
    shapes that remove at least one head (ties: keep more)."""
    g = n_heads // n_kv_heads
    target = (1.0 - sparsity) * n_heads
    shapes = [(kv, q) for kv in range(1, n_kv_heads + 1) for q in range(1, g + 1) if kv * q < n_heads]
    if not shapes:
        raise LmstackError("the model has a single attention head per layer; there is no head to remove")
    return min(shapes, key=lambda s: (abs(s[0] * s[1] - target), -s[0] * s[1], -s[0]))


@torch.no_grad()
def head_scores(model: Transformer, calib, batch_size: int = 8) -> list[torch.Tensor]:
    """Per block: (n_heads,) mean squared norm of each head's contribution to the residual stream,
    tr(W_o,h G_h W_o,h^T) / n with G_h = X_h^T X_h the Gram matrix of the head's attention outputs. Only the
    per-head (head_dim x head_dim) blocks of o_proj's input Gram matrix are accumulated, not the whole Hessian."""
    cfg = model.config
    h, d = cfg.n_heads, cfg.head_dim
    grams = [torch.zeros(h, d, d, dtype=torch.float64) for _ in model.blocks]

    def hook(i):
        def fn(mod, args):
            x = args[0].detach().float().reshape(-1, h, d)
            grams[i] += torch.einsum("nhd,nhe->hde", x, x).double().cpu()
        return fn

    handles = [b.attn.o_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        n = _run(model, calib, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for block, g in zip(model.blocks, grams):
        w = block.attn.o_proj.weight.detach().float().cpu().view(-1, h, d).transpose(0, 1)  # (H, d_model, D)
        out.append(((w @ g.float()) * w).sum((1, 2)) / n)
    return out


def select_heads(scores: torch.Tensor, n_kv_heads: int, kv_keep: int, q_keep: int) -> tuple[list[int], list[int]]:
    """(query heads kept, K/V heads kept), both sorted: in each group the q_keep best queries; the kv_keep groups
    whose kept queries score highest."""
    g = scores.numel() // n_kv_heads
    per_group = scores.view(n_kv_heads, g)
    best = per_group.topk(q_keep, dim=1)
    groups = sorted(best.values.sum(1).topk(kv_keep).indices.tolist())
    queries = sorted(k * g + j for k in groups for j in best.indices[k].tolist())
    return queries, groups


def _rows(t: torch.Tensor, heads: list[int], d: int, dim: int) -> torch.Tensor:
    idx = torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long, device=t.device)
    return t.index_select(dim, idx).clone()


def slice_heads(model: Transformer, keep: list[tuple[list[int], list[int]]]) -> Transformer:
    """A new model whose block i keeps the query heads keep[i][0] and the K/V heads keep[i][1] (the same counts in
    every block; query head order within a block is kept, so each still reads its own K/V head)."""
    fused = model.config.fused_projections
    model = _unfused(model)
    cfg = model.config
    n_q, n_kv = len(keep[0][0]), len(keep[0][1])
    if any(len(q) != n_q or len(kv) != n_kv for q, kv in keep) or n_q % n_kv:
        raise LmstackError("every block must keep the same number of query and K/V heads, queries a multiple of K/V")
    g, g_new = cfg.n_heads // cfg.n_kv_heads, n_q // n_kv
    for q, kv in keep:
        if sorted(h // g for h in q) != sorted(k for k in kv for _ in range(g_new)):
            raise LmstackError(f"kept query heads {q} do not fall {g_new} to each kept K/V head {kv}")
    d = cfg.head_dim
    state = dict(model.state_dict())
    for i, (q, kv) in enumerate(keep):
        pre = f"blocks.{i}.attn."
        for name, heads in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            for part in ("weight", "bias"):
                if pre + f"{name}.{part}" in state:
                    state[pre + f"{name}.{part}"] = _rows(state[pre + f"{name}.{part}"], heads, d, 0)
        state[pre + "o_proj.weight"] = _rows(state[pre + "o_proj.weight"], q, d, 1)
    return _rebuild(model, cfg.replace(n_heads=n_q, n_kv_heads=n_kv, head_dim=d), state, fused)


# ---------------------------------------------------------------- channels

def channel_count(d_ff: int, sparsity: float) -> int:
    """MLP channels to keep: round((1 - sparsity) * d_ff), to a multiple of CHANNEL_MULTIPLE when d_ff is one."""
    step = CHANNEL_MULTIPLE if d_ff % CHANNEL_MULTIPLE == 0 and d_ff > CHANNEL_MULTIPLE else 1
    keep = int((1.0 - sparsity) * d_ff / step + 0.5) * step  # halves round up, not to even
    return min(max(keep, step), d_ff - step)


def channel_scores(model: Transformer, stats) -> list[torch.Tensor]:
    """Per block: (d_ff,) ||W_down[:, j]||^2 * mean(a_j^2), channel j's mean squared contribution to the output."""
    out = []
    for i, block in enumerate(model.blocks):
        s = stats[f"blocks.{i}.mlp.down_proj"]
        w = block.mlp.down_proj.weight.detach().float()
        out.append(w.square().sum(0) * (s.sq_sum / s.n).float())
    return out


def slice_channels(model: Transformer, keep: list[list[int]]) -> Transformer:
    """A new model whose block i keeps MLP channels keep[i] (the same count in every block)."""
    fused = model.config.fused_projections
    model = _unfused(model)
    n = len(keep[0])
    if any(len(k) != n for k in keep):
        raise LmstackError("every block must keep the same number of MLP channels (ModelConfig has one d_ff)")
    state = dict(model.state_dict())
    for i, chans in enumerate(keep):
        idx = torch.tensor(sorted(chans), dtype=torch.long)
        pre = f"blocks.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            for part in ("weight", "bias"):
                if pre + f"{name}.{part}" in state:
                    state[pre + f"{name}.{part}"] = state[pre + f"{name}.{part}"].index_select(0, idx).clone()
        state[pre + "down_proj.weight"] = state[pre + "down_proj.weight"].index_select(1, idx).clone()
    return _rebuild(model, model.config.replace(d_ff=n, moe_d_ff=n), state, fused)


# ---------------------------------------------------------------- layers

def _run(model: Transformer, calib, batch_size: int) -> int:
    """Run the model (eval mode, no grad) over calibration ids, checked as collect_stats checks them ((N, T) ids or
    a list of 1-D sequences); returns the number of tokens."""
    seqs = _sequences(calib, model.config.vocab_size, model.config.max_seq_len)
    count = sum(s.numel() for s in seqs)
    if count < MIN_TOKENS:
        raise LmstackError(f"calibration data too short: {count} tokens, need at least {MIN_TOKENS}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in seqs:
                for start in range(0, s.shape[0], batch_size):
                    model(s[start:start + batch_size].to(device=device, dtype=torch.long))
    finally:
        model.train(was_training)
    return count


@torch.no_grad()
def layer_scores(model: Transformer, calib, batch_size: int = 8) -> torch.Tensor:
    """(n_layers,) block influence 1 - mean cos(input, output) over every calibration token; low = redundant."""
    total = torch.zeros(len(model.blocks), dtype=torch.float64)

    def hook(i):
        def fn(mod, args, out):
            total[i] += nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1).double().sum().cpu()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        count = _run(model, calib, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - total / count).float()


def drop_layers(model: Transformer, drop: list[int]) -> Transformer:
    """A new model without the blocks in `drop`; per-layer config lists (sliding window, MoE) are renumbered."""
    fused = model.config.fused_projections
    model = _unfused(model)
    cfg = model.config
    if cfg.n_unique_layers:
        raise LmstackError("layer pruning cannot drop a block that several layers share (n_unique_layers > 0)")
    drop = sorted(set(drop))
    if not drop or any(not 0 <= i < cfg.n_layers for i in drop) or len(drop) >= cfg.n_layers:
        raise LmstackError(f"layers to drop {drop} must be a non-empty proper subset of 0..{cfg.n_layers - 1}")
    kept = [i for i in range(cfg.n_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if int(i) in new_index:
                state[f"blocks.{new_index[int(i)]}.{rest}"] = v
        else:
            state[k] = v

    def renumber(layers):
        return None if layers is None else [new_index[i] for i in layers if i in new_index]

    new_cfg = cfg.replace(n_layers=len(kept), sliding_window_layers=renumber(cfg.sliding_window_layers),
                          moe_layers=renumber(cfg.moe_layers))
    return _rebuild(model, new_cfg, state, fused)


# ---------------------------------------------------------------- one entry point

def _check_model(model: Transformer, kind: str) -> None:
    cfg = model.config
    if kind not in KINDS:
        raise LmstackError(f"unknown structured pruning kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "heads":
        if cfg.position == "alibi":
            raise LmstackError("head pruning would change the ALiBi slope of every kept head (slopes follow the "
                               "head index and count); prune channels or layers instead")
        if cfg.attention != "softmax":
            raise LmstackError(f"head pruning supports attention='softmax' only; this model has {cfg.attention!r}")
    if kind == "layers" and cfg.n_unique_layers:
        raise LmstackError("layer pruning cannot drop a block that several layers share (n_unique_layers > 0)")
    if kind == "channels" and cfg.n_experts:
        raise LmstackError("channel pruning of mixture-of-experts MLPs is not supported; prune heads or layers")


def prune_structured(model: Transformer, kind: str, sparsity: float, calib) -> tuple[Transformer, dict]:
    """Prune `kind` (heads|channels|layers) at `sparsity` (the fraction to remove), scored on calibration ids
    (a (N, T) tensor). Returns (new model, report); `model` itself is not changed."""
    _check_sparsity(sparsity)
    _check_model(model, kind)
    cfg = model.config
    before = sum(p.numel() for p in model.parameters())
    if kind == "layers":
        scores = layer_scores(model, calib)
        n_drop = min(max(int(sparsity * cfg.n_layers + 0.5), 1), cfg.n_layers - 1)
        drop = sorted(scores.topk(n_drop, largest=False).indices.tolist())
        new = drop_layers(model, drop)
        report = {"kept": [i for i in range(cfg.n_layers) if i not in drop], "dropped": drop,
                  "removed_fraction": n_drop / cfg.n_layers, "scores": [round(float(s), 6) for s in scores]}
    else:
        if kind == "heads":
            kv_keep, q_keep = head_shape(cfg.n_heads, cfg.n_kv_heads, sparsity)
            keep = [select_heads(s, cfg.n_kv_heads, kv_keep, q_keep) for s in head_scores(model, calib)]
            new = slice_heads(model, keep)
            report = {"kept": [q for q, _ in keep], "kept_kv_heads": [kv for _, kv in keep],
                      "n_heads": [cfg.n_heads, kv_keep * q_keep], "n_kv_heads": [cfg.n_kv_heads, kv_keep],
                      "removed_fraction": 1.0 - kv_keep * q_keep / cfg.n_heads}
        else:
            n_keep = channel_count(cfg.d_ff, sparsity)
            scores = channel_scores(model, collect_stats(model, calib, hessian=False))
            keep = [sorted(s.topk(n_keep).indices.tolist()) for s in scores]
            new = slice_channels(model, keep)
            report = {"d_ff": [cfg.d_ff, n_keep], "removed_fraction": 1.0 - n_keep / cfg.d_ff}
    report.update(kind=kind, sparsity_requested=sparsity,
                  params_before=before, params_after=sum(p.numel() for p in new.parameters()))
    if not math.isclose(report["removed_fraction"], sparsity, abs_tol=0.05):
        report["note"] = (f"asked to remove {sparsity:.0%} of the {kind}; the shape allows "
                          f"{report['removed_fraction']:.1%}")
    return new, report
