"""Logits processors and the draw: raw logits (rows, vocab) -> one token per row (sampler.py drives them).

Each processor is a function (logits, rows) -> logits that touches only the rows whose params ask
for it, so a batch mixing greedy and sampled requests costs nothing extra for the plain ones. The
penalties, temperature and the truncations are batched tensor ops on the logits' device (repetition and
frequency/presence penalties gather and scatter through a padded (rows, max_len) token tensor). On a GPU
nothing here reads a value back: per-row parameters and row indices go up with non-blocking copies, and
draw() leaves its tokens on the device for the caller's one read-back per step; min_tokens, bad_words,
logit_bias and the grammar loop over the rows that use them, since each depends on that row's state. They
run in PROCESSORS order: bans and biases first (they change what is possible), then penalties, then
temperature and the truncations (top-k, top-p, min-p), which need the final distribution's shape.

- min_tokens: EOS and stop tokens get -inf until min_tokens tokens were generated.
- bad_words: a word's last token is banned right after the tokens before it were produced (bad_words.py).
- logit_bias: added as given (OpenAI semantics).
- repetition_penalty (CTRL, Keskar et al. 2019): logit/p if positive else logit*p for every token in
  prompt or output.
- frequency / presence penalties (OpenAI): logit - f*count - p*[count > 0] over the output.
- guided: tokens the grammar forbids get -inf (see constrained.py).
- temperature, then top_k, top_p (nucleus, Holtzman et al. 2020), min_p (Nguyen et al. 2024).

Usage:
    rows = [SamplingRow(params, prompt_ids, output_ids, generator=None, eos_ids={2})]
    logits = process(logits, rows)
    tokens = sample(logits, rows)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lmstack.errors import LmstackError
from lmstack.infer.bad_words import BadWords
from lmstack.infer.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the processors need to know about one row of logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()
    bad_word_ids: BadWords | list[list[int]] = field(default_factory=list)
    allowed: torch.Tensor | None = None
    """Bool (vocab,) mask from the guided decoder; None = everything allowed."""


def _to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a host sync (torch.tensor(..., device=cuda) waits for the copy)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _rows_where(rows: list[SamplingRow], pred: Callable[[SamplingParams], bool]) -> list[int]:
    return [i for i, r in enumerate(rows) if pred(r.params)]


def min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, r in enumerate(rows):
        p = r.params
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(r.eos_ids))
            banned = [t for t in banned if t < logits.shape[-1]]  # the engine refuses larger ids up front
            if banned:
                logits[i, banned] = NEG_INF
    return logits


def bad_words(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, r in enumerate(rows):
        if not r.bad_word_ids:
            continue
        index = r.bad_word_ids if isinstance(r.bad_word_ids, BadWords) else BadWords(r.bad_word_ids)
        banned = [t for t in index.banned(r.output_ids) if t < logits.shape[-1]]
        if banned:
            logits[i, banned] = NEG_INF
    return logits


def logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    vocab = logits.shape[-1]
    for i in _rows_where(rows, lambda p: bool(p.logit_bias)):
        ids = [t for t in rows[i].params.logit_bias if t < vocab]
        if ids:
            logits[i, ids] += torch.tensor([rows[i].params.logit_bias[t] for t in ids], dtype=logits.dtype,
                                            device=logits.device)
    return logits


def _padded_ids(id_lists: list[list[int]], device: torch.device, pad: int | None = None) -> torch.Tensor:
    """Ragged, non-empty token lists -> one (rows, max_len) long tensor. Padded with `pad`, or with each
    row's own first id when pad is None (a repeat of a real id: reading or rewriting it changes nothing)."""
    width = max(len(ids) for ids in id_lists)
    out = torch.empty((len(id_lists), width), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        out[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        out[i, len(ids):] = ids[0] if pad is None else pad
    return out if device.type == "cpu" else out.to(device, non_blocking=True)


def _active_view(logits: torch.Tensor, active: list[int]) -> torch.Tensor:
    """The rows in `active`: the tensor itself when that is every row (no copy), else a copy."""
    return logits if len(active) == logits.shape[0] else logits[_to(active, torch.long, logits.device)]


def repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """All penalised rows at once: gather each row's seen tokens (prompt + output) from a padded (rows,
    max_len) id tensor, penalise them, scatter them back. Only the seen entries are touched."""
    active = [i for i in _rows_where(rows, lambda p: p.repetition_penalty != 1.0)
              if rows[i].prompt_ids or rows[i].output_ids]
    if not active:
        return logits
    dev = logits.device
    ids = _padded_ids([rows[i].prompt_ids + rows[i].output_ids for i in active], dev)
    pen = _to([rows[i].params.repetition_penalty for i in active], logits.dtype, dev)[:, None]
    x = _active_view(logits, active)
    seen = x.gather(1, ids)
    x.scatter_(1, ids, torch.where(seen > 0, seen / pen, seen * pen))  # duplicates write the same value
    if x is not logits:
        logits.index_copy_(0, _to(active, torch.long, dev), x)
    return logits


def frequency_presence(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """All penalised rows at once: output-token counts scattered from their padded output lists."""
    active = [i for i in _rows_where(rows, lambda p: p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)
              if rows[i].output_ids]
    if not active:
        return logits
    vocab = logits.shape[-1]
    dev = logits.device
    ids = _padded_ids([rows[i].output_ids for i in active], dev, pad=vocab)  # the pad column is cut off
    counts = torch.zeros((len(active), vocab + 1), dtype=logits.dtype, device=dev)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=logits.dtype, device=dev))
    counts = counts[:, :vocab]
    freq = _to([rows[i].params.frequency_penalty for i in active], logits.dtype, dev)[:, None]
    pres = _to([rows[i].params.presence_penalty for i in active], logits.dtype, dev)[:, None]
    x = _active_view(logits, active)
    x -= freq * counts + pres * (counts > 0).to(logits.dtype)
    if x is not logits:
        logits.index_copy_(0, _to(active, torch.long, dev), x)
    return logits


def guided(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Tokens a row's allowed mask (its grammar's, its phrase bans') leaves out get -inf: one masked fill for
    all masked rows when their masks cover the whole row, else row by row."""
    vocab = logits.shape[-1]
    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not masked:
        return logits
    masks = [rows[i].allowed[:vocab] for i in masked]
    if len(masks) > 1 and all(m.numel() == vocab and m.device == masks[0].device for m in masks):
        banned = ~torch.stack(masks)
        if banned.device != logits.device:  # the grammar's masks are built on the CPU
            banned = banned.to(logits.device, non_blocking=True)
        if len(masked) == logits.shape[0]:
            return logits.masked_fill_(banned, NEG_INF)
        index = _to(masked, torch.long, logits.device)
        logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(banned, NEG_INF))
        return logits
    for i, allowed in zip(masked, masks):
        if allowed.device != logits.device:
            allowed = allowed.to(logits.device, non_blocking=True)
        logits[i].masked_fill_(~allowed, NEG_INF)
    return logits


def temperature(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        t = _to(temps, logits.dtype, logits.device)[:, None]
        scaled = logits / t
        over = scaled.amax(dim=-1, keepdim=True) == float("inf")
        # x / T overflowed (huge logits, small T): (x - max) / T <= 0 cannot. Selected with where, not an
        # `if`, so no value is read back to the host
        logits = torch.where(over, (logits - logits.amax(dim=-1, keepdim=True)) / t, scaled)
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    active = [i for i, r in enumerate(rows) if not r.params.greedy and
              (r.params.top_k or r.params.top_p < 1.0 or r.params.min_p > 0.0)]
    if not active:
        return logits
    sub = _active_view(logits, active)
    vocab = sub.shape[-1]
    dev = sub.device
    top_k = _to([min(rows[i].params.top_k or vocab, vocab) for i in active], torch.long, dev)
    top_p = _to([rows[i].params.top_p for i in active], sub.dtype, dev)[:, None]
    min_p = _to([rows[i].params.min_p for i in active], sub.dtype, dev)[:, None]
    sorted_logits, order = sub.sort(dim=-1, descending=True)
    # top-k: everything ranked at or past k goes
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    # min-p: relative to the most likely token
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False  # the top token always survives
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    kept = torch.full_like(sub, NEG_INF).scatter(-1, order, sorted_logits)
    if sub is logits:
        return kept
    logits.index_copy_(0, _to(active, torch.long, dev), kept)
    return logits


def finite(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalties and biases on huge logits can overflow to +inf; clamp back so the softmax stays finite."""
    return logits.nan_to_num_(nan=NEG_INF, posinf=torch.finfo(logits.dtype).max, neginf=NEG_INF)


# Applied in this order. Bans and biases, penalties, the grammar, then the distribution's shape.
PROCESSORS: dict[str, Callable[[torch.Tensor, list[SamplingRow]], torch.Tensor]] = {
    "min_tokens": min_tokens,
    "bad_words": bad_words,
    "logit_bias": logit_bias,
    "repetition_penalty": repetition_penalty,
    "frequency_presence": frequency_presence,
    "guided": guided,
    "finite": finite,
    "temperature": temperature,
    "top_k_top_p_min_p": top_k_top_p_min_p,
}


def needs_processing(p: SamplingParams) -> bool:
    """False for plain greedy / plain temperature sampling, which skip every processor but temperature."""
    return bool(p.min_tokens or p.bad_words or p.logit_bias or p.repetition_penalty != 1.0
                or p.frequency_penalty or p.presence_penalty or p.guided or p.top_k or p.top_p < 1.0 or p.min_p)


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy with NaN -> -inf and +inf -> the largest float, so no row can turn the softmax into
    NaN (inf - inf). A model that emits NaN then bans that token rather than crashing the sampler."""
    return finite(logits.float().clone(), [])


def process(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply every processor; returns processed float32 logits (a new tensor; the input is untouched)."""
    logits = sanitize(logits)
    if any(needs_processing(r.params) or r.allowed is not None for r in rows):
        for fn in PROCESSORS.values():
            logits = fn(logits, rows)
    else:
        logits = temperature(logits, rows)
    return logits


def process_bans(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Only the processors that change what is allowed or preferred (no temperature or truncation):
    what beam search scores with."""
    logits = sanitize(logits)
    for name, fn in PROCESSORS.items():
        if name not in ("temperature", "top_k_top_p_min_p"):
            logits = fn(logits, rows)
    return logits


class NoTokenAllowed(LmstackError):
    """Every token of a row is banned (bad_words, min_tokens, logit_bias, a grammar): nothing to sample."""


def dead_rows(logits: torch.Tensor) -> torch.Tensor:
    """Bool (rows,): rows whose every logit is -inf."""
    return ~torch.isfinite(logits).any(dim=-1)


def check_rows(logits: torch.Tensor, dead: torch.Tensor | None = None) -> None:
    """Raise NoTokenAllowed naming the first row whose every logit is -inf."""
    dead = dead_rows(logits) if dead is None else dead
    if bool(dead.any()):
        raise NoTokenAllowed(f"row {int(dead.nonzero()[0])}: every token is banned by this request's "
                             "bad_words / logit_bias / min_tokens / grammar, so none can be sampled")


def sample(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None
           ) -> list[int]:
    """Processed logits (rows, vocab) -> one token per row: argmax for greedy rows, else a draw.

    A row with its own generator (a seeded request) draws alone from it with torch.multinomial, so its
    tokens depend on its seed only (and stay what they were before the batched sampler); the other sampled
    rows draw together from the default generator by inverting their CDFs at one uniform each (one
    searchsorted for the batch, several times cheaper than torch.multinomial on a CPU)."""
    check_rows(logits)
    return draw(logits, rows, default_generator).tolist()


def draw(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None
         ) -> torch.Tensor:
    """sample() without the checks or the read-back: a (rows,) long tensor on the logits' device, built
    without reading any value back, so a GPU step pays one host transfer, made by the caller (sampler.py).
    Rows must be checked first (check_rows), or their dead_rows read back with the tokens: a dead row
    draws an arbitrary token here instead of raising."""
    out = logits.argmax(dim=-1)
    dev = out.device
    shared = []
    for i, r in enumerate(rows):
        if r.params.greedy:
            continue
        if r.generator is not None:
            out[i] = _multinomial(logits[i].softmax(dim=-1), r.generator)[0].to(dev, non_blocking=True)
        else:
            shared.append(i)
    if shared:
        drawn = _inverse_cdf(_active_view(logits, shared).softmax(dim=-1), default_generator).to(dev)
        if len(shared) == len(rows):
            return drawn
        out.index_copy_(0, _to(shared, torch.long, dev), drawn)
    return out


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: the first index whose cumulative probability exceeds u * total, u ~ U[0, 1). A
    zero-probability token adds nothing to the CDF, so it is never the first to exceed it."""
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True)[:, 0]
    # u * total can round up to the total itself: then take the most likely token, never one past the end
    return torch.where(idx < probs.shape[-1], idx, probs.argmax(dim=-1))


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row, on the generator's device: seeded generators live on the CPU, so a seed gives the
    same tokens whatever device the logits are on."""
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    if probs.device.type != "cpu":  # a dead row (NaN after softmax) must not trip the GPU kernel's assert
        probs = probs.nan_to_num(nan=1.0)
    return torch.multinomial(probs, 1, generator=generator)


def probabilities(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution each row samples from: softmax, or one-hot on the argmax for greedy rows."""
    probs = logits.softmax(dim=-1)
    for i, r in enumerate(rows):
        if r.params.greedy:
            probs[i] = 0.0
            probs[i, int(logits[i].argmax())] = 1.0
    return probs


def top_logprobs(logprobs: torch.Tensor, chosen: list[int], k: int) -> list[dict[int, float]]:
    """Per row: {chosen token: logprob} plus the k most likely tokens."""
    out = []
    top_v, top_i = (logprobs.topk(k, dim=-1) if k else (None, None))
    chosen_lp = logprobs.gather(-1, torch.tensor(chosen)[:, None])[:, 0].tolist()
    for r, tok in enumerate(chosen):
        d = {tok: chosen_lp[r]}
        if k:
            for t, v in zip(top_i[r].tolist(), top_v[r].tolist()):
                d.setdefault(t, v)
        out.append(d)
    return out
