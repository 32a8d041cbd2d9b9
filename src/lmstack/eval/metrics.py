"""Metrics for eval tasks: per-item scores and the aggregates / standard errors over items.

Per item: acc (argmax of choice log-likelihoods is the gold), acc_norm (the same after dividing each
log-likelihood by the choice's length in characters, as lm-eval does), exact_match.
Over items: mean, the unbiased pass@k estimator of Chen et al. (2021), expected calibration error for
multiple-choice answers, and a seeded bootstrap standard error for any aggregate.

Usage:
    from lmstack.eval import metrics as M
    M.acc([-1.2, -0.3], gold=1)                      # 1.0
    M.acc_norm([-2.0, -3.0], ["a", "bbbbbb"], 1)     # 1.0  (-3/6 > -2/1), though acc is 0.0
    M.pass_at_k(n=10, c=3, k=1)                      # 0.3
    M.ece(list_of_choice_lls, golds)
    M.bootstrap_stderr(M.mean, values, iters=1000, seed=1234)
"""
from __future__ import annotations

import math
import random
import re
import string
from typing import Callable, Sequence


def _argmax(xs: Sequence[float]) -> int:
    # First maximum wins on ties, like numpy.argmax (lm-eval's choice).
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def acc(lls: Sequence[float], gold: int | Sequence[int]) -> float:
    """1.0 if the highest-likelihood choice is the gold (or one of several golds)."""
    pred = _argmax(lls)
    golds = [gold] if isinstance(gold, int) else list(gold)
    return float(pred in golds)


def acc_norm(lls: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> float:
    """acc after normalising each log-likelihood by its choice's character length (lm-eval's acc_norm).

    lm-eval divides by len(choice) of the choice text as returned by doc_to_choice (without the target
    delimiter); an empty choice counts as length 1 so it cannot divide by zero."""
    normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return acc(normed, gold)


def normalize_answer(text: str, ignore_case: bool = True, ignore_punctuation: bool = False) -> str:
    text = text.strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str | Sequence[str], ignore_case: bool = True,
                ignore_punctuation: bool = False) -> float:
    """1.0 if the prediction equals a reference after stripping (and case/whitespace folding)."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    pred = normalize_answer(prediction, ignore_case, ignore_punctuation)
    return float(any(pred == normalize_answer(r, ignore_case, ignore_punctuation) for r in refs))


def mean(values: Sequence[float]) -> float:
    values = list(values)
    if not values:
        return float("nan")
    return sum(values) / len(values)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as a running product so large n does not overflow."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    exps = [math.exp(x - m) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def ece(choice_lls: Sequence[Sequence[float]], golds: Sequence[int], n_bins: int = 10) -> float:
    """Expected calibration error of multiple-choice answers.

    Each item's confidence is the softmax over its choices' log-likelihoods at the predicted choice;
    items fall into `n_bins` equal-width confidence bins; ECE = sum_b (|b|/N) * |accuracy_b - confidence_b|."""
    if len(choice_lls) != len(golds):
        raise ValueError(f"ece: {len(choice_lls)} items of log-likelihoods but {len(golds)} golds")
    if not choice_lls:
        return float("nan")
    bins: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for lls, gold in zip(choice_lls, golds):
        probs = softmax(lls)
        pred = _argmax(probs)
        conf = probs[pred]
        # Bins are (lo, hi]; confidence 0 can't happen (it is at least 1/n_choices), 1.0 goes in the last bin.
        b = min(max(math.ceil(conf * n_bins) - 1, 0), n_bins - 1)
        bins[b].append((conf, float(pred == gold)))
    total = len(golds)
    err = 0.0
    for items in bins:
        if items:
            avg_conf = sum(c for c, _ in items) / len(items)
            avg_acc = sum(a for _, a in items) / len(items)
            err += len(items) / total * abs(avg_acc - avg_conf)
    return err


def bootstrap_stderr(fn: Callable[[list], float], values: Sequence, iters: int = 1000, seed: int = 1234) -> float:
    """Standard error of fn(values) by the bootstrap: the std of fn over `iters` resamples with replacement.

    Seeded, so the same values always give the same stderr. For fn=mean this approaches
    std(values)/sqrt(n) (the closed form); the bootstrap also covers aggregates with no closed form."""
    values = list(values)
    n = len(values)
    if n < 2 or iters < 2:
        return float("nan")
    rng = random.Random(seed)
    stats = []
    for _ in range(iters):
        sample = [values[rng.randrange(n)] for _ in range(n)]
        stats.append(fn(sample))
    mu = sum(stats) / len(stats)
    return math.sqrt(sum((s - mu) ** 2 for s in stats) / (len(stats) - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """Closed-form standard error of the mean: sample std / sqrt(n) (what lm-eval reports for means)."""
    values = list(values)
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


# name -> aggregation function, so tasks can name aggregations in plain strings.
AGGREGATIONS: dict[str, Callable[[list], float]] = {"mean": mean}
