"""Multi-task SFT mixtures: draw examples from several tasks in set proportions, deterministically.

`weights` are target shares of the mixture (they need not sum to 1). With `total` examples in the mixture,
task t gets round(total * w_t / sum(w)) draws (largest-remainder rounding, so the counts add up to total).
Draws walk a seeded permutation of the task's examples, so a task is downsampled without repeats, and an
upsampled task repeats every example as evenly as possible (each one k or k+1 times) before any repeats a
third time. The draws of all tasks are then shuffled together with the same seed. Same inputs + seed ->
the same list.

A weight for a task that has no examples is an error naming the tasks there are; tasks missing from
`weights` are left out of the mixture (their count is 0 in the report).

Usage:
    tasks = group_by_task(examples)                          # {"qa": [...], "arithmetic": [...], ...}
    mixed, counts = mix_tasks(tasks, {"qa": 2, "arithmetic": 1}, total=3000, seed=0)
    counts                                                    # {"qa": 2000, "arithmetic": 1000}
"""
from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

from lmstack.errors import LmstackError

T = TypeVar("T")


def group_by_task(examples: Sequence[T], key: str = "task") -> dict[str, list[T]]:
    """{task: examples} in first-seen order; works on SFTExample (attribute) and dict rows (key)."""
    out: dict[str, list[T]] = {}
    for ex in examples:
        name = ex.get(key, "") if isinstance(ex, dict) else getattr(ex, key, "")
        out.setdefault(str(name), []).append(ex)
    return out


def shares(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts proportional to weights that add up to exactly `total` (largest remainder)."""
    bad = {k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
           or not math.isfinite(w) or w < 0}
    if bad:
        raise LmstackError(f"mixture weights must be finite numbers >= 0; got {bad}")
    norm = sum(weights.values())
    if norm <= 0:
        raise LmstackError(f"mixture weights {weights} sum to 0; give at least one task a positive weight")
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    left = total - sum(counts.values())
    # hand the remaining units to the largest fractional parts; ties go to the earlier task (deterministic)
    order = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(exact).index(k)))
    for k in order[:left]:
        counts[k] += 1
    return counts


def draw(items: Sequence[T], n: int, rng: random.Random) -> list[T]:
    """n items walking seeded permutations: no repeats until every item was drawn once, and so on."""
    if n and not items:
        raise LmstackError("cannot draw from a task with no examples")
    out: list[T] = []
    while len(out) < n:
        perm = list(range(len(items)))
        rng.shuffle(perm)
        out.extend(items[i] for i in perm[: n - len(out)])
    return out


def mix_tasks(tasks: dict[str, Sequence[T]], weights: dict[str, float] | None = None, total: int | None = None,
              seed: int = 0, shuffle: bool = True) -> tuple[list[T], dict[str, int]]:
    """(mixed examples, draws per task). weights=None keeps the natural proportions (each task's size);
    total=None makes the mixture as large as all tasks together."""
    if not tasks:
        raise LmstackError("no tasks to mix")
    if weights is None:
        weights = {k: float(len(v)) for k, v in tasks.items()}
    unknown = [k for k in weights if k not in tasks or not tasks[k]]
    if unknown:
        raise LmstackError(f"mixture weight for task {unknown[0]!r}, which has no examples; "
                           f"tasks with examples: {', '.join(k for k, v in tasks.items() if v)}")
    total = sum(len(v) for v in tasks.values()) if total is None else total
    if total < 1:
        raise LmstackError(f"mixture total={total} must be >= 1")
    counts = shares(weights, total)
    out: list[T] = []
    for name in tasks:  # fixed task order, each with its own seeded stream: adding a task moves no other draw
        n = counts.get(name, 0)
        out.extend(draw(list(tasks[name]), n, random.Random(f"{seed}/{name}")))
    if shuffle:
        random.Random(seed).shuffle(out)
    return out, {name: counts.get(name, 0) for name in tasks}
