"""Caption metrics written from their papers: corpus BLEU-4, CIDEr-D, and the shapes world's attribute match.

- `corpus_bleu` is Papineni et al. (2002): clipped n-gram precisions p_1..p_4 summed over the whole corpus,
  their geometric mean, times the brevity penalty exp(1 - r/c) when the candidates' total length c is under the
  effective reference length r (for each candidate the reference length closest to its own, ties to the shorter).
  Smoothing: none by default (a corpus with no matching 4-gram scores 0, as in the paper); smoothing="add1" is
  Lin & Och (2004): add 1 to the matches and the total of every n > 1, which sentence-level scores need.
- `cider_d` is Vedantam et al. (2015) in its "D" form, as pycocoevalcap computes it: per n (1..4) a tf-idf vector
  of the n-gram counts, idf = log(#images) - log(max(1, #images whose references hold the n-gram)); the candidate's
  counts are clipped to the reference's (min(c, r) * r in the dot product), cosine over the norms, times a gaussian
  length penalty exp(-(len_c - len_r)^2 / (2 * 6^2)); averaged over references and over n, times 10.
- `attribute_match` reads the truth from the scene, never from a reference text: a caption's exact match is 1
  when the set of (colour, shape) pairs it names equals the set of pairs in the scene; recall is the share of the
  scene's pairs it names.
Text is lower-cased and split into words and numbers (punctuation dropped), the same for every metric.

Usage:
    from lmstack.eval.caption_metrics import corpus_bleu, cider_d, attribute_match, tokenize
    bleu = corpus_bleu(["a red circle"], [["a red circle", "one red circle"]])          # 1.0
    bleu, stderr = corpus_bleu_stderr(candidates, references)      # bootstrap over captions
    cider = cider_d(candidates, references)          # {"score": corpus mean, "per_item": [...]}
    exact, recall = attribute_match("A small red circle.", record["scene"])
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import COLOURS, SHAPES

_WORD = re.compile(r"[a-z0-9]+")
CIDER_SIGMA = 6.0  # the gaussian length penalty's width, as in CIDEr-D


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers; punctuation is dropped (COCO's PTB tokenizer does the same for captions)."""
    if not isinstance(text, str):
        raise LmstackError(f"a caption must be a string, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(candidates: list[str], references: list[list[str]]) -> None:
    if len(candidates) != len(references):
        raise LmstackError(f"{len(candidates)} candidates but {len(references)} reference lists; give one list of "
                           "references per candidate")
    if not candidates:
        raise LmstackError("no candidates to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise LmstackError(f"references[{i}] must be a non-empty list of strings, got {refs!r:.80}")


def bleu_stats(candidate: str, references: list[str], max_n: int = 4) -> list[int]:
    """One caption's BLEU sufficient statistics: [matches_1..n, totals_1..n, candidate length, reference length];
    a corpus's statistics are the sums of its captions' (what makes BLEU a corpus score)."""
    c = tokenize(candidate)
    rs = [tokenize(r) for r in references]
    # the effective reference length: the closest to the candidate's, the shorter one on a tie
    ref_len = min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
    matches, totals = [], []
    for n in range(1, max_n + 1):
        got = ngrams(c, n)
        most: Counter = Counter()
        for r in rs:
            most |= ngrams(r, n)  # per n-gram, the most times any one reference has it (the clip)
        matches.append(sum(min(k, most[g]) for g, k in got.items()))
        totals.append(max(len(c) - n + 1, 0))
    return matches + totals + [len(c), ref_len]


def bleu_from_stats(stats: list[int], max_n: int = 4, smoothing: str = "none") -> float:
    """BLEU from summed bleu_stats."""
    if smoothing not in ("none", "add1"):
        raise LmstackError(f"smoothing must be 'none' or 'add1', got {smoothing!r}")
    matches, totals, (cand_len, ref_len) = stats[:max_n], stats[max_n:2 * max_n], stats[2 * max_n:]
    if cand_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        m, t = matches[n], totals[n]
        if smoothing == "add1" and n > 0:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / max_n
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return bp * math.exp(log_p)


def corpus_bleu(candidates: list[str], references: list[list[str]], max_n: int = 4,
                smoothing: str = "none") -> float:
    """Corpus BLEU-max_n in [0, 1] (Papineni et al.); smoothing 'none' or 'add1' (Lin & Och, n > 1)."""
    _check(candidates, references)
    per_item = [bleu_stats(c, refs, max_n) for c, refs in zip(candidates, references)]
    return bleu_from_stats([sum(col) for col in zip(*per_item)], max_n, smoothing)


def corpus_bleu_stderr(candidates: list[str], references: list[list[str]], max_n: int = 4, n_boot: int = 200,
                       seed: int = 0) -> tuple[float, float]:
    """(corpus BLEU, its bootstrap standard error over captions resampled with replacement, n_boot times)."""
    _check(candidates, references)
    per_item = [bleu_stats(c, refs, max_n) for c, refs in zip(candidates, references)]
    score = bleu_from_stats([sum(col) for col in zip(*per_item)], max_n)
    rng = random.Random(seed)
    n = len(per_item)
    boots = []
    for _ in range(n_boot):
        pick = [per_item[rng.randrange(n)] for _ in range(n)]
        boots.append(bleu_from_stats([sum(col) for col in zip(*pick)], max_n))
    mean = sum(boots) / n_boot
    return score, math.sqrt(sum((b - mean) ** 2 for b in boots) / max(n_boot - 1, 1))


def sentence_bleu(candidate: str, references: list[str], max_n: int = 4) -> float:
    """BLEU of one caption, add-1 smoothed (an unsmoothed one is 0 whenever a 4-gram is missing)."""
    return corpus_bleu([candidate], [references], max_n, smoothing="add1")


def _tfidf(counts: Counter, idf: dict, log_n: float) -> tuple[dict, float]:
    vec = {g: k * (log_n - idf.get(g, 0.0)) for g, k in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def cider_d(candidates: list[str], references: list[list[str]], max_n: int = 4,
            sigma: float = CIDER_SIGMA) -> dict:
    """CIDEr-D: {"score": mean over candidates, "per_item": one score each}. The idf comes from these references,
    so a corpus of one image has idf 0 everywhere and scores 0 (as pycocoevalcap does)."""
    _check(candidates, references)
    ref_words = [[tokenize(r) for r in refs] for refs in references]
    ref_counts = [[[ngrams(w, n) for n in range(1, max_n + 1)] for w in rs] for rs in ref_words]
    df: Counter = Counter()
    for per_ref in ref_counts:
        df.update(set().union(*(set(c) for counts in per_ref for c in counts)))
    log_docs = math.log(float(len(candidates)))
    log_df = {g: math.log(max(1.0, k)) for g, k in df.items()}
    per_item = []
    for cand, rs, r_counts in zip(candidates, ref_words, ref_counts):
        c_words = tokenize(cand)
        c_vecs = [_tfidf(ngrams(c_words, n), log_df, log_docs) for n in range(1, max_n + 1)]
        total = 0.0
        for r_w, counts in zip(rs, r_counts):
            delta = len(c_words) - len(r_w)
            penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
            for (c_vec, c_norm), r_c in zip(c_vecs, counts):
                r_vec, r_norm = _tfidf(r_c, log_df, log_docs)
                if c_norm == 0 or r_norm == 0:
                    continue
                dot = sum(min(v, r_vec[g]) * r_vec[g] for g, v in c_vec.items() if g in r_vec)
                total += penalty * dot / (c_norm * r_norm)
        per_item.append(10.0 * total / (max_n * len(rs)))
    return {"score": sum(per_item) / len(per_item), "per_item": per_item}


def _singular(word: str) -> str | None:
    if word in SHAPES:
        return word
    for shape in SHAPES:  # the world's plurals: circles, crosses
        if word in (shape + "s", shape + "es"):
            return shape
    return None


def mentioned_pairs(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: a colour word directly followed by a shape word."""
    words = tokenize(caption)
    out = set()
    for a, b in zip(words, words[1:]):
        shape = _singular(b)
        if a in COLOURS and shape is not None:
            out.add((a, shape))
    return out


def scene_pairs(scene: dict) -> set[tuple[str, str]]:
    try:
        return {(o["colour"], o["shape"]) for o in scene["objects"]}
    except (KeyError, TypeError):
        raise LmstackError("a scene must be a dict with 'objects', each with 'colour' and 'shape' "
                           "(a vision_world record's 'scene')") from None


def attribute_match(caption: str, scene: dict) -> tuple[float, float]:
    """(exact, recall): exact is 1.0 when the caption names exactly the scene's (colour, shape) pairs, recall the
    share of the scene's pairs it names."""
    truth = scene_pairs(scene)
    said = mentioned_pairs(caption)
    if not truth:
        return float(not said), 1.0
    return float(said == truth), len(said & truth) / len(truth)


__all__ = ["tokenize", "ngrams", "bleu_stats", "bleu_from_stats", "corpus_bleu", "corpus_bleu_stderr", "sentence_bleu", "cider_d", "mentioned_pairs", "scene_pairs",
           "attribute_match", "CIDER_SIGMA"]
