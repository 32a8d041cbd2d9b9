"""Curriculum learning: order SFT examples by a difficulty score instead of at random.

The synthetic world grades its arithmetic (difficulty = number of operations, 1..5), and encode_rows keeps
that score on each example; examples without one are scored by the length of their assistant reply. The
strategies (CURRICULA, chosen by name):

    random        seeded shuffle (the baseline)
    easy_to_hard  sorted by difficulty; ties shuffled
    hard_to_easy  the reverse (anti-curriculum, a control)
    staged        "baby steps" (Spitkovsky et al. 2010): stage k holds every example of difficulty <= level k,
                  shuffled, and the stages follow each other, so easy examples are revisited while harder
                  ones are added
    competence    competence-based sampling (Platanios et al. 2019): at progress p the next example is drawn
                  from the easiest c(p) = sqrt(p (1 - c0^2) + c0^2) fraction of the data

All return a new list (staged and competence may repeat examples; `length` sets how many they return).
benchmarks/finetune_methods.py measures easy_to_hard and competence against random order.

Usage:
    ordered = order_examples(examples, "competence", seed=0, length=2000)
    loader = SFTLoader(pack_examples(ordered, 256, pad_id), batch_size=8, shuffle=False)   # keep the order
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from lmstack.errors import LmstackError


def difficulty_of(example) -> float:
    """The example's difficulty score, or the number of tokens it learns when it has none."""
    d = float(getattr(example, "difficulty", 0.0) or 0.0)
    return d if d > 0 else float(getattr(example, "n_learned", 0))


def _sorted(examples: Sequence, rng: random.Random, reverse: bool = False) -> list:
    keyed = [(difficulty_of(e), rng.random(), i) for i, e in enumerate(examples)]  # random tie-break
    keyed.sort(reverse=reverse)
    return [examples[i] for _, _, i in keyed]


def _random(examples, rng, length, c0):
    out = list(examples)
    rng.shuffle(out)
    return out


def _easy_to_hard(examples, rng, length, c0):
    return _sorted(examples, rng)


def _hard_to_easy(examples, rng, length, c0):
    return _sorted(examples, rng, reverse=True)


def _staged(examples, rng, length, c0):
    levels = sorted({difficulty_of(e) for e in examples})
    out = []
    for level in levels:
        stage = [e for e in examples if difficulty_of(e) <= level]
        rng.shuffle(stage)
        out.extend(stage)
    return out if length is None else out[:length]


def competence(progress: float, c0: float = 0.1) -> float:
    """Platanios et al.'s square-root competence: the fraction of (easiest-first) data available at progress."""
    return min(1.0, math.sqrt(progress * (1 - c0 * c0) + c0 * c0))


def _competence(examples, rng, length, c0):
    ranked = _sorted(examples, rng)
    n = len(ranked)
    length = n if length is None else length
    out = []
    for i in range(length):
        k = max(1, int(math.ceil(competence(i / max(length, 1), c0) * n)))
        out.append(ranked[rng.randrange(k)])
    return out


CURRICULA: dict[str, Callable] = {
    "random": _random, "easy_to_hard": _easy_to_hard, "hard_to_easy": _hard_to_easy,
    "staged": _staged, "competence": _competence,
}


def order_examples(examples: Sequence, strategy: str = "random", seed: int = 0, length: int | None = None,
                   c0: float = 0.1) -> list:
    """`examples` in the order curriculum `strategy` gives (see the module docstring)."""
    if strategy not in CURRICULA:
        raise LmstackError(f"curriculum {strategy!r} is not allowed; choose one of {', '.join(CURRICULA)}")
    if not 0 < c0 <= 1:
        raise LmstackError(f"competence c0={c0} must be in (0, 1]")
    if not examples:
        return []
    return CURRICULA[strategy](list(examples), random.Random(seed), length, c0)


def difficulty_profile(examples: Sequence, n_bins: int = 5) -> list[float]:
    """Mean difficulty of each consecutive fifth (n_bins parts) of an ordering, to show its shape."""
    scores = [difficulty_of(e) for e in examples]
    if not scores:
        return []
    edges = [round(len(scores) * k / n_bins) for k in range(n_bins + 1)]
    return [sum(scores[a:b]) / max(b - a, 1) for a, b in zip(edges, edges[1:]) if b > a]


__all__ = ["CURRICULA", "competence", "difficulty_of", "difficulty_profile", "order_examples"]
