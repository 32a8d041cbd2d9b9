"""Fusing several rankings into one: reciprocal-rank fusion and a weighted blend of normalised scores.

- `rrf` (Cormack, Clarke & Buettcher 2009): score(d) = sum over rankings r of 1 / (k + rank_r(d)), ranks
  counted from 1, a ranking that lacks d adding nothing. It needs no score calibration at all, which is why it
  is the default way to join BM25 (unbounded scores) with cosine similarities (in [-1, 1]); k = 60 damps the
  weight of the very top ranks, the paper's value.
- `blend`: each score map is min-max normalised to [0, 1] (a map whose scores are all equal maps them to 1),
  then combined as sum_i w_i * norm_i(d); an id missing from a map gets 0 there. It uses the score gaps RRF
  throws away, at the price of a weight to tune.

Both return (id, fused score) best first; equal scores keep the order in which ids were first seen, so the
result is deterministic.

Usage:
    from lmstack.rag.hybrid import blend, rrf
    rrf([["a", "b", "c"], ["b", "a"]])                    # [("a", 1/61 + 1/62), ("b", ...), ("c", 1/63)]
    blend([{"a": 12.0, "b": 3.0}, {"b": 0.9, "c": 0.1}], weights=[0.5, 0.5])
"""
from __future__ import annotations

import math
from typing import Sequence

from lmstack.errors import LmstackError


def _ranked(scores: dict[str, float], order: dict[str, int]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def rrf(rankings: Sequence[Sequence[str]], k: float = 60) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion of id rankings (each best first); an id repeated within one ranking counts at
    its best rank."""
    if k < 0:
        raise LmstackError(f"rrf k must be >= 0, got {k}")
    fused: dict[str, float] = {}
    order: dict[str, int] = {}
    for ranking in rankings:
        seen = set()
        for rank, doc_id in enumerate(ranking, start=1):
            if doc_id in seen:
                continue
            seen.add(doc_id)
            order.setdefault(doc_id, len(order))
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return _ranked(fused, order)


def minmax(scores: dict[str, float]) -> dict[str, float]:
    """Scores rescaled to [0, 1] (best 1, worst 0); all-equal scores all become 1."""
    if not scores:
        return {}
    for doc_id, s in scores.items():
        if not math.isfinite(s):
            raise LmstackError(f"score of {doc_id!r} is {s}; blend needs finite scores")
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return {d: 1.0 for d in scores}
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def blend(score_maps: Sequence[dict[str, float]], weights: Sequence[float]) -> list[tuple[str, float]]:
    """Weighted sum of min-max normalised score maps, best first."""
    if len(score_maps) != len(weights):
        raise LmstackError(f"blend got {len(score_maps)} score maps but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise LmstackError(f"blend weights must be >= 0, got {list(weights)}")
    fused: dict[str, float] = {}
    order: dict[str, int] = {}
    for scores, w in zip(score_maps, weights):
        for doc_id, s in minmax(scores).items():
            order.setdefault(doc_id, len(order))
            fused[doc_id] = fused.get(doc_id, 0.0) + w * s
    return _ranked(fused, order)
