"""Near-duplicate detection: our numpy MinHash-LSH vs datasketch's MinHashLSH, same corpus, same run.

The corpus has planted near-duplicates: base documents are random walks of a word-bigram model of
Tiny Shakespeare (random Zipf words when ../shared/data is absent), then 20% more documents are
copies of random bases with 0.5-2% of their words deleted, replaced or followed by an inserted
word. Both methods see raw text and do the same work, single-process, streaming in order:
word 5-gram shingles, 128 permutations, LSH with 25 bands x 5 rows, candidates confirmed when the
estimated Jaccard >= 0.7, each document checked against all earlier ones and then indexed.
datasketch uses its fastest per-document path (MinHash.update_batch).

Metrics: documents per second (whole dedup, from text), and precision / recall of the flagged
duplicates against the planted clusters. SimHash (64-bit, Hamming <= 6) is measured on the same
corpus and reported alongside.

Usage:
    python benchmarks/dedup.py [--docs 10000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
from _common import result, write_result

from lmstack.data.dedup.minhash import MinHashConfig, MinHasher, MinHashLSH
from lmstack.data.dedup.shingles import words
from lmstack.data.dedup.simhash import SimHashConfig, SimHasher, SimHashIndex

SHAKESPEARE = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare/input.txt"
CFG = MinHashConfig(num_perm=128, bands=25, rows=5, ngram=5, threshold=0.7)
BATCH = 1000


def word_source(seed: int):
    """A function returning a random document: a bigram walk over Shakespeare, or Zipf words."""
    rng = random.Random(seed)
    if SHAKESPEARE.is_file():
        tokens = SHAKESPEARE.read_text(encoding="utf-8").split()
        follow: dict[str, list[str]] = {}
        for a, b in zip(tokens, tokens[1:]):
            follow.setdefault(a, []).append(b)

        def doc(n: int) -> list[str]:
            w = rng.choice(tokens)
            out = [w]
            for _ in range(n - 1):
                w = rng.choice(follow.get(w) or tokens)
                out.append(w)
            return out

        return doc, tokens, "tinyshakespeare bigram walks"
    vocab = [f"w{i}" for i in range(20000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)

    def doc(n: int) -> list[str]:
        return rng.choices(vocab, weights=weights, k=n)

    return doc, vocab, "Zipf random words"


def build_corpus(n_docs: int, seed: int = 0):
    """Texts and each text's planted cluster id (-1 for unique documents)."""
    rng = random.Random(seed + 1)
    make, vocab, kind = word_source(seed)
    n_base = int(n_docs / 1.2)
    texts = [" ".join(make(rng.randint(100, 300))) for _ in range(n_base)]
    cluster = [-1] * n_base
    for _ in range(n_docs - n_base):
        src = rng.randrange(n_base)
        rate = rng.uniform(0.005, 0.02)
        out = []
        for w in texts[src].split():
            u = rng.random()
            if u < rate / 3:
                continue
            if u < 2 * rate / 3:
                out.append(rng.choice(vocab))
            elif u < rate:
                out += [w, rng.choice(vocab)]
            else:
                out.append(w)
        cluster[src] = src
        cluster.append(src)
        texts.append(" ".join(out))
    # Shuffle so copies do not always follow their originals.
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [cluster[i] for i in order], kind


def score(flagged: dict[int, int], cluster: list[int]) -> dict[str, float]:
    """Precision/recall of 'doc j duplicates earlier doc i' against the planted clusters."""
    correct = sum(1 for j, i in flagged.items() if cluster[j] >= 0 and cluster[j] == cluster[i])
    # Every planted cluster member except the first one seen should be flagged.
    first_seen: set[int] = set()
    expected = 0
    for c in cluster:
        if c >= 0:
            expected += c in first_seen
            first_seen.add(c)
    return {"precision": round(correct / max(len(flagged), 1), 4), "recall": round(correct / max(expected, 1), 4),
            "flagged": len(flagged), "expected": expected}


def run_ours(texts: list[str]) -> dict[int, int]:
    hasher, lsh = MinHasher(CFG), MinHashLSH(CFG)
    flagged = {}
    for s in range(0, len(texts), BATCH):
        reps = lsh.add(hasher.signatures(texts[s:s + BATCH]))
        for k, r in enumerate(reps.tolist()):
            if r >= 0:
                flagged[s + k] = r
    return flagged


def run_datasketch(texts: list[str]) -> dict[int, int]:
    from datasketch import MinHash, MinHashLSH as DSLSH

    lsh = DSLSH(num_perm=CFG.num_perm, params=(CFG.bands, CFG.rows))
    sketches = []
    flagged = {}
    for j, text in enumerate(texts):
        w = words(text)
        shingles = [" ".join(w[i:i + CFG.ngram]).encode("utf-8") for i in range(max(len(w) - CFG.ngram + 1, 1))]
        m = MinHash(num_perm=CFG.num_perm, seed=1)
        m.update_batch(shingles)
        best, best_sim = -1, CFG.threshold
        for key in lsh.query(m):
            sim = m.jaccard(sketches[key])
            if sim >= best_sim:
                best, best_sim = key, sim
        if best >= 0:
            flagged[j] = best
        lsh.insert(j, m)
        sketches.append(m)
    return flagged


def run_simhash(texts: list[str]) -> dict[int, int]:
    cfg = SimHashConfig()
    hasher, index = SimHasher(cfg), SimHashIndex(cfg)
    flagged = {}
    for s in range(0, len(texts), BATCH):
        for k, r in enumerate(index.add(hasher.signatures(texts[s:s + BATCH])).tolist()):
            if r >= 0:
                flagged[s + k] = r
    return flagged


def timed(fn, texts, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(texts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    texts, cluster, kind = build_corpus(args.docs)
    n_words = sum(len(t.split()) for t in texts)
    print(f"corpus: {len(texts)} docs ({kind}), {n_words / len(texts):.0f} words/doc on average")
    ours_rate, ours_flagged = timed(run_ours, texts, args.repeat)
    ds_rate, ds_flagged = timed(run_datasketch, texts, args.repeat)
    sim_rate, sim_flagged = timed(run_simhash, texts, args.repeat)
    ours_q, ds_q, sim_q = score(ours_flagged, cluster), score(ds_flagged, cluster), score(sim_flagged, cluster)
    print(f"ours       {ours_rate:8.0f} docs/s  {ours_q}")
    print(f"datasketch {ds_rate:8.0f} docs/s  {ds_q}")
    print(f"simhash    {sim_rate:8.0f} docs/s  {sim_q}")
    config = {"docs": len(texts), "corpus": kind, "words_per_doc": round(n_words / len(texts)),
              "planted_edit_rate": [0.005, 0.02], "num_perm": CFG.num_perm, "bands": CFG.bands, "rows": CFG.rows,
              "ngram": CFG.ngram, "threshold": CFG.threshold, "processes": 1, "repeat": args.repeat,
              "ours_quality": ours_q, "datasketch_quality": ds_q,
              "recall_at_least_baseline": ours_q["recall"] >= ds_q["recall"],
              "simhash": {"docs_per_s": round(sim_rate, 1), **sim_q, "max_distance": SimHashConfig().max_distance}}
    write_result("dedup", [
        result("dedup", "docs_per_s", True, round(ours_rate, 1), "datasketch MinHashLSH (update_batch)",
               round(ds_rate, 1), goal=2.0, **config),
        result("dedup_recall", "recall", True, ours_q["recall"], "datasketch MinHashLSH (update_batch)",
               ds_q["recall"], goal=1.0, docs=len(texts), precision_ours=ours_q["precision"],
               precision_baseline=ds_q["precision"]),
    ])


if __name__ == "__main__":
    main()
