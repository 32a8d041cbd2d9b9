"""Speech recognition metrics: word and character error rate with their error breakdown, and a bootstrap stderr.

WER = (substitutions + deletions + insertions) / reference words, summed over the corpus (not a mean of
per-utterance rates, so long utterances weigh more, as jiwer and the papers compute it). The counts come from
one minimum-edit (Levenshtein) alignment per utterance; among alignments of equal cost the backtrace prefers a
match or substitution, then a deletion, then an insertion. CER is the same over characters (spaces included).

Text normalisation before scoring (`normalize`): lowercase, apostrophes removed ("Ada's" -> "adas"), every
other character that is not a letter or digit becomes a space, spaces collapsed. So "Born in Amberhaven."
and "born in amberhaven" score as equal.

Usage:
    from lmstack.eval.speech_metrics import wer, cer, normalize, bootstrap_stderr
    wer(["Ada was born."], ["ada was bored"])   # {"wer": 0.333, "errors": 1, "words": 3, "sub": 1, "del": 0, ...}
    cer(refs, hyps)["cer"]
    bootstrap_stderr(refs, hyps, metric="wer")   # stderr of the corpus WER over utterances resampled
"""
from __future__ import annotations

import random
import re

from lmstack.errors import LmstackError

_NOT_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse spaces."""
    if not isinstance(text, str):
        raise LmstackError(f"a transcript must be a string, got {type(text).__name__}")
    return " ".join(_NOT_WORD.sub(" ", text.lower().replace("'", "").replace("\u2019", "")).split())


def align_counts(ref: list, hyp: list) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of one minimum-edit alignment of hyp to ref."""
    n, m = len(ref), len(hyp)
    # dist[i][j]: edits turning ref[:i] into hyp[:j]
    dist = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        dist[i][0] = i
    for j in range(m + 1):
        dist[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            dist[i][j] = min(dist[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]), dist[i - 1][j] + 1, dist[i][j - 1] + 1)
    sub = dele = ins = 0
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and dist[i][j] == dist[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            sub += ref[i - 1] != hyp[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and dist[i][j] == dist[i - 1][j] + 1:
            dele, i = dele + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    return sub, dele, ins


def _check(refs: list[str], hyps: list[str]) -> None:
    if not isinstance(refs, (list, tuple)) or not isinstance(hyps, (list, tuple)):
        raise LmstackError("refs and hyps must be lists of strings")
    if len(refs) != len(hyps):
        raise LmstackError(f"{len(refs)} references but {len(hyps)} hypotheses; give one hypothesis per reference")
    if not refs:
        raise LmstackError("no utterances to score (refs is empty)")


def _error_rate(refs: list[str], hyps: list[str], unit: str) -> dict:
    _check(refs, hyps)
    split = (lambda s: normalize(s).split()) if unit == "words" else (lambda s: list(normalize(s)))
    sub = dele = ins = total = 0
    for r, h in zip(refs, hyps):
        rs, hs = split(r), split(h)
        s, d, i = align_counts(rs, hs)
        sub, dele, ins, total = sub + s, dele + d, ins + i, total + len(rs)
    if total == 0:
        raise LmstackError(f"the references hold no {unit} after normalisation; an error rate is undefined")
    errors = sub + dele + ins
    return {"errors": errors, unit: total, "sub": sub, "del": dele, "ins": ins, "utterances": len(refs),
            "rate": errors / total}


def wer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus word error rate: {"wer", "errors", "words", "sub", "del", "ins", "utterances"}."""
    out = _error_rate(refs, hyps, "words")
    return {"wer": out.pop("rate"), **out}


def cer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus character error rate: {"cer", "errors", "chars", "sub", "del", "ins", "utterances"}."""
    out = _error_rate(refs, hyps, "chars")
    return {"cer": out.pop("rate"), **out}


def bootstrap_stderr(refs: list[str], hyps: list[str], metric: str = "wer", n_boot: int = 1000,
                     seed: int = 0) -> float:
    """Standard deviation of the corpus error rate over `n_boot` resamples of the utterances (with
    replacement): the error bar of a test set this size."""
    _check(refs, hyps)
    if metric not in ("wer", "cer"):
        raise LmstackError(f"metric must be 'wer' or 'cer', got {metric!r}")
    split = (lambda s: normalize(s).split()) if metric == "wer" else (lambda s: list(normalize(s)))
    per = []
    for r, h in zip(refs, hyps):
        rs = split(r)
        per.append((sum(align_counts(rs, split(h))), len(rs)))
    rng = random.Random(seed)
    rates = []
    for _ in range(n_boot):
        pick = [per[rng.randrange(len(per))] for _ in per]
        words = sum(w for _, w in pick)
        if words:
            rates.append(sum(e for e, _ in pick) / words)
    mean = sum(rates) / len(rates)
    return (sum((x - mean) ** 2 for x in rates) / max(1, len(rates) - 1)) ** 0.5


__all__ = ["wer", "cer", "normalize", "align_counts", "bootstrap_stderr"]
