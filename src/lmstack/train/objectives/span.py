"""T5 span corruption with sentinel tokens, in UL2's decoder-only framing (Raffel et al. 2020; Tay et al. 2022).

A row of S source tokens loses round(S * noise_density) of them in k = round(noise / mean_span)
spans. The input part keeps the rest with each span replaced by one sentinel; the targets part lists
every sentinel followed by the span it hides, and ends with one more sentinel that closes the list:

    source   the cat sat on the mat today
    inputs   the <s0> on the <s1>
    targets  <s0> cat sat <s1> mat today <s2>

The decoder-only model reads [inputs ; targets] with prefix_len = len(inputs), so the corrupted input
is encoded bidirectionally and the targets are generated causally; only the targets are scored.
Span lengths follow T5's `random_spans_noise_mask`: the noise tokens are cut into k random positive
parts, so spans have mean length mean_span, and the kept tokens into the k + 1 runs around them.
Unlike T5, the first and last kept runs may be empty: T5 always ends a row with a span, which on short
rows with a single span would always hide the row's tail, turning the task into plain prefix LM.

The combined sequence is S + 2k + 1 tokens long, so S is the largest source length whose result fits
the row's T+1 tokens; the remaining tokens of the loader's row are not used, and shorter results are
padded at the end (no loss there). Sentinel i is first_sentinel_id - i (default mask_token_id - 1 - i).
The objective ignores doc_ids: spans are cut without regard to document boundaries inside a packed
row, as in T5's own pipeline, which concatenates documents before corrupting them.

Usage:
    obj = SpanCorruption(ObjectiveConfig(name="span", noise_density=0.15, mean_span=3), model_cfg)
    batch = obj.prepare(tokens, generator)   # input_ids, targets, loss_mask, prefix_len, lengths
    inputs, targets = corrupt(seq, noise_mask(len(seq), 0.15, 3.0, g), sentinels)
    assert torch.equal(reconstruct(inputs, targets, sentinels), seq)
"""
from __future__ import annotations

from functools import lru_cache

import torch

from lmstack.config import ConfigError
from lmstack.errors import LmstackError
from lmstack.train.objectives.base import Objective, pack_rows


@lru_cache(maxsize=256)
def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a source of `length` tokens; at least one span and one kept token."""
    n_noise = min(max(int(length * density + 0.5), 1), length - 1)  # round half up, so hand counts are easy
    n_spans = min(max(int(n_noise / mean_span + 0.5), 1), n_noise, length - n_noise)
    return n_noise, n_spans


@lru_cache(maxsize=256)
def fit_source_length(budget: int, density: float, mean_span: float, lead: int = 0) -> int:
    """The longest source whose corrupted form (lead + S + 2k + 1 tokens) fits `budget` tokens."""
    for s in range(budget - lead, 1, -1):
        _, k = span_counts(s, density, mean_span)
        if lead + s + 2 * k + 1 <= budget:
            return s
    raise LmstackError(f"rows of {budget} tokens are too short for span corruption (noise_density={density}, "
                       f"mean_span={mean_span}); use rows of at least {lead + 5} tokens")


def _random_partition(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """n items cut into `parts` random positive lengths (uniform over all such cuts)."""
    if parts == 1:
        return [n]
    cuts = (torch.randperm(n - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def noise_mask(length: int, density: float, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """(length,) bool, True on corrupted tokens: k spans of mean length mean_span, kept runs between."""
    n_noise, k = span_counts(length, density, mean_span)
    noise = _random_partition(n_noise, k, generator)
    # k + 1 kept runs around the spans; the first and last may be empty (cut n_keep + 2 into positive
    # parts, then take one back from each end), so a span can open or close the row.
    keep = _random_partition(length - n_noise + 2, k + 1, generator)
    keep[0] -= 1
    keep[-1] -= 1
    mask = torch.zeros(length, dtype=torch.bool)
    pos = keep[0]
    for span, kept in zip(noise, keep[1:]):
        mask[pos:pos + span] = True
        pos += span + kept
    return mask


def corrupt(seq: torch.Tensor, mask: torch.Tensor, sentinels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each span (a run of True in mask) by the next sentinel; return (inputs, targets)."""
    ids, noisy = seq.tolist(), mask.tolist()
    n_spans = sum(1 for i, m in enumerate(noisy) if m and (i == 0 or not noisy[i - 1]))
    if n_spans + 1 > len(sentinels):
        raise LmstackError(f"span corruption needs {n_spans + 1} sentinels for this row but "
                           f"objective.n_sentinels={len(sentinels)}; raise n_sentinels or lower noise_density")
    inputs: list[int] = []
    targets: list[int] = []
    k = 0
    for i, (tok, m) in enumerate(zip(ids, noisy)):
        if not m:
            inputs.append(tok)
            continue
        if i == 0 or not noisy[i - 1]:  # a span starts: one sentinel stands for it in both parts
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            k += 1
        targets.append(tok)
    targets.append(sentinels[k])  # closes the last span
    return torch.tensor(inputs, dtype=seq.dtype), torch.tensor(targets, dtype=seq.dtype)


def reconstruct(inputs: torch.Tensor, targets: torch.Tensor, sentinels: list[int]) -> torch.Tensor:
    """Invert `corrupt`: put every span back in place of its sentinel."""
    lookup = {s: i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for tok in targets.tolist():
        if tok in lookup:
            current = lookup[tok]
            spans[current] = []
        elif current is not None:
            spans[current].append(tok)
    out: list[int] = []
    for tok in inputs.tolist():
        out.extend(spans[lookup[tok]] if tok in lookup else [tok])
    return torch.tensor(out, dtype=inputs.dtype)


def span_row(row: torch.Tensor, density: float, mean_span: float, generator: torch.Generator,
             sentinels: list[int], lead: list[int] | None = None,
             pad_id: int | None = None) -> tuple[torch.Tensor, int]:
    """One row of T+1 tokens -> (lead + inputs + targets, prefix length) fitting in T+1 tokens.

    Trailing padding is not part of the source; a row with fewer than 2 real tokens comes back as it
    is (with prefix 1), so padding targets leave it unscored."""
    lead = lead or []
    s = fit_source_length(row.shape[0], density, mean_span, len(lead))
    if pad_id is not None:
        real = (row != pad_id).nonzero()
        s = min(s, int(real[-1]) + 1 if len(real) else 0)
    if s < 2:
        return row, 1
    inputs, targets = corrupt(row[:s], noise_mask(s, density, mean_span, generator), sentinels)
    head = torch.tensor(lead, dtype=row.dtype)
    return torch.cat((head, inputs, targets)), len(lead) + inputs.shape[0]


def sentinel_ids(cfg, mask_id: int, vocab_size: int) -> list[int]:
    """sentinel_i = first - i, first = objective.first_sentinel_id (default mask_token_id - 1)."""
    first = mask_id - 1 if cfg.first_sentinel_id is None else cfg.first_sentinel_id
    if first >= vocab_size or first - cfg.n_sentinels + 1 < 0:
        raise ConfigError(f"objective.n_sentinels={cfg.n_sentinels} sentinels counting down from id {first} do not "
                          f"fit in [0, vocab_size={vocab_size}); lower n_sentinels or move "
                          "first_sentinel_id / mask_token_id")
    ids = [first - i for i in range(cfg.n_sentinels)]
    if mask_id in ids:
        raise ConfigError(f"objective.first_sentinel_id={first}: the sentinels overlap mask_token_id={mask_id}")
    return ids


class SpanCorruption(Objective):
    name = "span"
    attention = "causal"
    min_len = 5

    def __init__(self, cfg, model_cfg, pad_id: int | None = None):
        super().__init__(cfg, model_cfg, pad_id)
        self.sentinels = sentinel_ids(cfg, self.mask_id, self.vocab_size)
        self.reserved = list(self.sentinels)
        self.fill = pad_id if pad_id is not None else 0

    def _prepare(self, tokens: torch.Tensor, generator: torch.Generator,
                 doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        rows = [span_row(r, self.cfg.noise_density, self.cfg.mean_span, generator, self.sentinels, pad_id=self.pad_id)
                for r in tokens]
        return pack_rows(rows, tokens.shape[1] - 1, self.fill)
