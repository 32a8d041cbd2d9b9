"""Explanations for a decoder's next-token prediction (IX.9): attention maps, attention rollout,
gradient×input and integrated gradients over the prompt tokens.

- Attention maps. The model's fast path is left alone: for the length of one forward, each attention
  module's backend is wrapped by a recorder that works out softmax(q·k^T·scale + ALiBi, softcap, mask)
  from the very q, k and mask the backend receives (after RoPE, QK-norm and GQA grouping), keeps the
  probabilities, and still returns the real backend's output. It also measures how far p·v is from that
  output, so every explanation says how faithfully its maps reproduce the layer (`reproduction_error`).
- Rollout (Abnar & Zuidema 2020): per layer, average the heads, mix in the identity for the residual
  stream (0.5·A + 0.5·I), renormalise rows, and multiply through the layers, last layer on the left.
- Gradient×input: d logit[target] / d e_i · e_i summed over the embedding, for each prompt token i, where e
  is the token embedding the model looks up (positions stay as they are).
- Integrated gradients (Sundararajan et al. 2017): the same gradient averaged along the straight line from
  a baseline embedding (zeros, the mean embedding, or a token's such as pad) to e, with `steps` points
  (trapezoid or midpoint Riemann rule), times (e - baseline). Completeness says the attributions sum to
  f(e) - f(baseline); `ig_gap` reports how far they are, so too few steps show up as a number, not a silent
  error.
- keep_ids: tokens that are structure rather than content (a chat template's special tokens, BOS) can be
  held at their input in the baseline, as Captum's BERT tutorial keeps [CLS] and [SEP]; they then get zero
  attribution from both gradient methods, and the explanation is over the content. Why it matters: when
  everything moves at once, integrated gradients split the credit for an interaction by where along the
  path each part switches on, and the marker that gates a copy takes part of the copied token's credit: on
  the copy task (benchmarks/explain_attribution.py) the top lands on the copied token for 72.5% of prompts
  and on the marker for 19% with every token free, and on the copied token for 99.5% with the structure held.

The target is the logit of one token at the last position; by default the model's greedy next token.

Usage:
    from lmstack.safety.explain import explain, attention_maps, rollout, integrated_gradients
    ex = explain(model, ids, steps=32)                  # ids: list[int] or (T,) tensor
    ex = explain(model, ids, baseline=tok.pad_id, keep_ids=tok.special_ids)   # over the content tokens
    ex.attention        # (L, H, T, T) probabilities;   ex.rollout (T, T)
    ex.grad_x_input     # (T,);  ex.integrated_gradients (T,);  ex.ig_gap, ex.ig_relative_gap
    probs, err = attention_maps(model, ids)
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import torch

from lmstack.errors import LmstackError
from lmstack.model.attention import Attention
from lmstack.model.positions import alibi_bias

Rule = Literal["trapezoid", "riemann"]
Baseline = Literal["zero", "mean"] | int


@dataclass
class Explanation:
    """Everything one explanation found, as CPU fp32 tensors over the T prompt tokens."""

    ids: list[int]
    target_id: int
    attention: torch.Tensor
    """(L, H, T, T) attention probabilities: layer, query head, query position, key position."""
    rollout: torch.Tensor
    """(T, T) attention rollout; row t says how much of position t's final state flows from each input."""
    grad_x_input: torch.Tensor
    """(T,) gradient×input per prompt token."""
    integrated_gradients: torch.Tensor
    """(T,) integrated gradients per prompt token."""
    target_logit: float
    """f(x): the target's logit at the last position."""
    baseline_logit: float
    """f(baseline): the same logit with every token embedding replaced by the baseline."""
    ig_gap: float
    """sum(integrated_gradients) - (f(x) - f(baseline)): completeness error of the path integral."""
    reproduction_error: float
    """max |p·v - backend output| over layers: how exactly the recorded maps reproduce the attention."""
    steps: int = 32
    baseline: str = "zero"
    """The integrated-gradients baseline: 'zero', 'mean' or 'token <id>'."""
    kept: list[int] = field(default_factory=list)
    """Prompt positions held at their input in the baseline (special tokens): zero attribution by construction."""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ig_relative_gap(self) -> float:
        """|ig_gap| / |f(x) - f(baseline)| (0 when the two logits agree)."""
        delta = abs(self.target_logit - self.baseline_logit)
        return abs(self.ig_gap) / delta if delta > 0 else 0.0


# ---- attention maps ------------------------------------------------------------------------------------
def softmax_probs(q: torch.Tensor, k: torch.Tensor, mask, scale: float, slopes=None,
                  softcap: float = 0.0) -> torch.Tensor:
    """(B, H, Tq, Tk) attention probabilities in fp32, as the softmax backends define them.

    q (B, H, Tq, D), k (B, Hkv, Tk, D): query head h reads key head h // (H / Hkv), the grouping the
    backends use for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        s = s + alibi_bias(slopes.float(), mask.q_pos, mask.k_pos, mask.causal)[None]
    visible = None if mask.is_full() else mask.dense()
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    # a query that sees no key (a padding row) gets zeros, as the naive backend gives it
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)


def _mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = p.shape[1] // v.shape[1]
    v = v.repeat_interleave(group, dim=1) if group > 1 else v
    return p @ v.float()


@contextlib.contextmanager
def recording_attention(model: torch.nn.Module) -> Iterator[list[dict]]:
    """Within the block, every softmax attention call of `model` appends {"probs", "error"} to the list.

    Each Attention's backend (an instance attribute) is wrapped and put back afterwards, so nothing of the
    model changes outside the block. A shared block (ALBERT) records once per layer it serves, in order."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise LmstackError(f"{type(model).__name__} has no lmstack attention modules to record")
    for m in modules:
        if m.linear is not None:
            raise LmstackError(f"attention={m.kind!r} has no softmax probabilities to show; "
                               "attention maps need attention='softmax'")
    records: list[dict] = []
    originals = [m.backend for m in modules]

    def recorder(backend: Callable) -> Callable:
        def record(q, k, v, mask, scale, slopes=None, softcap=0.0, dropout_p=0.0, **kwargs):
            out = backend(q, k, v, mask, scale, slopes=slopes, softcap=softcap, dropout_p=dropout_p, **kwargs)
            with torch.no_grad():
                probs = softmax_probs(q.detach(), k.detach(), mask, scale, slopes, softcap)
                error = (_mix(probs, v.detach()) - out.detach().float()).abs().max().item()
            records.append({"probs": probs, "error": error})
            return out
        return record

    try:
        for m, backend in zip(modules, originals):
            m.backend = recorder(backend)
        yield records
    finally:
        for m, backend in zip(modules, originals):
            m.backend = backend


def _as_ids(model: torch.nn.Module, ids) -> torch.Tensor:
    """(1, T) long tensor on the model's device, after the checks every entry point shares."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    t = ids.shape[1]
    if t == 0:
        raise LmstackError("the prompt is empty: give at least one token to explain")
    cfg = model.config
    if t > cfg.max_seq_len:
        raise LmstackError(f"the prompt has {t} tokens, more than the model's context (max_seq_len="
                           f"{cfg.max_seq_len}); shorten it")
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise LmstackError(f"token ids must lie in [0, {cfg.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
    if cfg.head != "lm":
        raise LmstackError(f"explanations need a decoder with an LM head, not head={cfg.head!r}")
    return ids.to(next(model.parameters()).device)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no dropout: an explanation must be deterministic
    try:
        yield
    finally:
        model.train(was_training)


def attention_maps(model: torch.nn.Module, ids) -> tuple[torch.Tensor, float]:
    """((L, H, T, T) attention probabilities of one forward over `ids`, max reproduction error)."""
    ids = _as_ids(model, ids)
    with _eval_mode(model), torch.no_grad(), recording_attention(model) as records:
        model(ids, logits_to_keep=1)
    return _stack(records)


def _stack(records: list[dict]) -> tuple[torch.Tensor, float]:
    probs = torch.stack([r["probs"][0] for r in records]).cpu()
    return probs, max(r["error"] for r in records)


def rollout(attention: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout of (L, H, T, T) maps -> (T, T), each row a distribution over input positions.

    residual: the identity's weight per layer (Abnar & Zuidema use 0.5: the residual stream carries as much
    as the attention does)."""
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise LmstackError(f"rollout needs (layers, heads, T, T) attention, got {tuple(attention.shape)}")
    if not 0.0 <= residual <= 1.0:
        raise LmstackError(f"rollout residual weight must lie in [0, 1], got {residual}")
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    out = eye
    for layer in attention:
        a = (1 - residual) * layer.mean(0) + residual * eye
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        out = a @ out  # later layers act on what earlier ones already mixed
    return out


# ---- gradient attributions -----------------------------------------------------------------------------
@contextlib.contextmanager
def _embeddings_replaced(model: torch.nn.Module, emb: torch.Tensor) -> Iterator[None]:
    """Within the block, the token embedding lookup returns `emb` instead (scaling, positions and
    everything after it run as usual), so gradients can be taken with respect to the embeddings."""
    handle = model.tok_emb.register_forward_hook(lambda module, args, out: emb.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def _target_logits(model: torch.nn.Module, ids: torch.Tensor, emb: torch.Tensor, target: int) -> torch.Tensor:
    """(B,) logit of `target` at the last position for each row of embeddings emb (B, T, D)."""
    with _embeddings_replaced(model, emb):
        logits = model(ids.expand(emb.shape[0], -1), logits_to_keep=1)
    return logits[:, -1, target].float()


def _embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.tok_emb(ids).detach().float()


def greedy_target(model: torch.nn.Module, ids) -> int:
    """The model's greedy next token after `ids`."""
    ids = _as_ids(model, ids)
    with _eval_mode(model), torch.no_grad():
        return int(model(ids, logits_to_keep=1)[0, -1].argmax())


def _check_target(model: torch.nn.Module, target: int, what: str = "target token id") -> int:
    vocab = model.config.vocab_size
    if not 0 <= int(target) < vocab:
        raise LmstackError(f"{what} {target} is outside the vocabulary [0, {vocab})")
    return int(target)


def _held(ids: torch.Tensor, keep_ids: Iterable[int]) -> torch.Tensor:
    """(1, T) bool: the positions whose token is one of keep_ids."""
    keep = torch.tensor(sorted({int(i) for i in keep_ids}), dtype=ids.dtype, device=ids.device)
    return torch.isin(ids, keep) if len(keep) else torch.zeros_like(ids, dtype=torch.bool)


def gradient_x_input(model: torch.nn.Module, ids, target: int, keep_ids: Iterable[int] = ()) -> torch.Tensor:
    """(T,) gradient×input of the target's last-position logit, one value per prompt token; positions holding a
    token of keep_ids (structure, not content: see baseline_embeddings) get 0."""
    ids, target = _as_ids(model, ids), _check_target(model, target)
    with _eval_mode(model):
        emb = _embed(model, ids).requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_logits(model, ids, emb, target).sum(), emb)
    attr = (grad * emb.detach()).sum(-1)
    return attr.masked_fill(_held(ids, keep_ids), 0.0)[0].cpu()


def _path(steps: int, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of a quadrature rule over [0, 1] with `steps` intervals."""
    if steps < 1:
        raise LmstackError(f"integrated gradients need steps >= 1, got {steps}")
    if rule == "trapezoid":
        alphas = torch.linspace(0.0, 1.0, steps + 1)
        weights = torch.full((steps + 1,), 1.0 / steps)
        weights[0] = weights[-1] = 0.5 / steps
        return alphas, weights
    if rule == "riemann":  # midpoints: exact for linear integrands, like the trapezoid
        return (torch.arange(steps) + 0.5) / steps, torch.full((steps,), 1.0 / steps)
    raise LmstackError(f"unknown integration rule {rule!r}; choose trapezoid or riemann")


def baseline_embeddings(model: torch.nn.Module, ids: torch.Tensor, baseline: Baseline,
                        keep_ids: Iterable[int] = ()) -> torch.Tensor:
    """The path's start for prompt `ids` (1, T): 'zero', 'mean' (the average token embedding) or a token id
    (that token's embedding at every position, e.g. the pad token). Positions holding a token of keep_ids
    (a chat template's special tokens) keep their own embedding, so they stay fixed along the path and get
    zero attribution: the explanation is over the content, with the template's structure in place (the
    reference Captum's BERT tutorial builds, [CLS] pad ... pad [SEP])."""
    x = _embed(model, ids)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, str)):
        raise LmstackError(f"baseline must be 'zero', 'mean' or a token id, got {baseline!r}")
    if isinstance(baseline, int):
        base = _embed(model, torch.full_like(ids, _check_target(model, baseline, "baseline token id")))
    elif baseline == "zero":
        base = torch.zeros_like(x)
    elif baseline == "mean":
        base = model.tok_emb.weight.detach().float().mean(0).expand_as(x).clone()
    else:
        raise LmstackError(f"unknown baseline {baseline!r}; choose zero, mean or a token id (the CLI's pad)")
    return torch.where(_held(ids, keep_ids)[..., None], x, base)


def integrated_gradients(model: torch.nn.Module, ids, target: int, steps: int = 32, baseline: Baseline = "zero",
                         rule: Rule = "trapezoid", batch_size: int = 16, keep_ids: Iterable[int] = ()
                         ) -> tuple[torch.Tensor, float, float]:
    """((T,) integrated gradients, f(x), f(baseline)) for the target's last-position logit.

    baseline: see baseline_embeddings. The zero embedding is the textbook choice, but a model that normalises
    its residual stream (RMSNorm, eps ~1e-6) jumps right next to zero, and a fixed grid cannot integrate that
    spike: the completeness gap then shows it, and a token baseline (pad) or 'mean' avoids it.
    keep_ids: token ids held at their input (see baseline_embeddings).
    The path's points run through the model batch_size at a time."""
    ids, target = _as_ids(model, ids), _check_target(model, target)
    alphas, weights = _path(steps, rule)
    with _eval_mode(model):
        x, base = _embed(model, ids), baseline_embeddings(model, ids, baseline, keep_ids)
        with torch.no_grad():
            ends = _target_logits(model, ids, torch.cat([x, base]), target)
        total = torch.zeros_like(x[0])
        alphas, weights = alphas.to(x.device), weights.to(x.device)
        for start in range(0, len(alphas), batch_size):
            a = alphas[start:start + batch_size, None, None]
            points = (base + a * (x - base)).requires_grad_(True)
            (grad,) = torch.autograd.grad(_target_logits(model, ids, points, target).sum(), points)
            total += (grad * weights[start:start + batch_size, None, None]).sum(0)
    attr = ((x - base)[0] * total).sum(-1).cpu()
    return attr, float(ends[0]), float(ends[1])


def explain(model: torch.nn.Module, ids, target: int | None = None, steps: int = 32,
            baseline: Baseline = "zero", rule: Rule = "trapezoid", residual: float = 0.5,
            keep_ids: Iterable[int] = ()) -> Explanation:
    """Attention maps, rollout, gradient×input and integrated gradients for one prompt and target token
    (default: the greedy next token). Each part's wall-clock seconds go in .seconds."""
    ids_t = _as_ids(model, ids)
    seconds = {}
    start = time.perf_counter()
    attention, error = attention_maps(model, ids_t)
    target = greedy_target(model, ids_t) if target is None else _check_target(model, target)
    seconds["attention"] = time.perf_counter() - start
    start = time.perf_counter()
    roll = rollout(attention, residual)
    seconds["rollout"] = time.perf_counter() - start
    start = time.perf_counter()
    keep_ids = sorted({int(i) for i in keep_ids})
    gxi = gradient_x_input(model, ids_t, target, keep_ids)
    seconds["grad_x_input"] = time.perf_counter() - start
    start = time.perf_counter()
    ig, fx, fb = integrated_gradients(model, ids_t, target, steps, baseline, rule, keep_ids=keep_ids)
    seconds["integrated_gradients"] = time.perf_counter() - start
    return Explanation(ids=ids_t[0].tolist(), target_id=target, attention=attention, rollout=roll,
                       grad_x_input=gxi, integrated_gradients=ig, target_logit=fx, baseline_logit=fb,
                       ig_gap=float(ig.sum()) - (fx - fb), reproduction_error=error, steps=steps,
                       baseline=baseline if isinstance(baseline, str) else f"token {baseline}",
                       kept=[i for i, t in enumerate(ids_t[0].tolist()) if t in keep_ids], seconds=seconds)
