"""Compression-based tokenization: merge tokens whose embeddings cluster tightly, and measure what it costs.

The seed calls this "compression-based (t-SNE) optimization"; the nearest well-defined version is:
1. Embed tokens cheaply: a token co-occurrence matrix (window ±2) on an encoded corpus, turned into
   positive PMI and reduced by truncated SVD (U·sqrt(S), rows L2-normalised). No model training needed.
2. Cluster: join the most cosine-similar pairs of frequent tokens (union-find, best pairs first) until
   `n_remove` ids are gone. Tokens of a cluster share one id, so the vocabulary shrinks by n_remove.
3. Cost: the clustered vocabulary is a class-based LM, P(w | prev) = P(class(w) | class(prev)) ·
   P(w | class(w)). Held-out perplexity of that model vs the plain token-bigram model (same smoothing) is the
   perplexity cost of the merge. t-SNE itself is only a 2-D visualisation and is not used here.

Usage:
    clusters = cluster_tokens(tok, train_texts, n_remove=200)
    report = perplexity_cost(tok, train_texts, test_texts, clusters)   # {"ppl_tokens": .., "ppl_clusters": ..}
"""
from __future__ import annotations

from collections import Counter
import math

import numpy as np

from lmstack.errors import LmstackError
from lmstack.tokenizer.core import Tokenizer


def svd_embeddings(seqs: list[list[int]], vocab_size: int, dim: int = 32, window: int = 2,
                   seed: int = 0) -> np.ndarray:
    """Token embeddings (vocab_size, dim) from a PPMI co-occurrence matrix and truncated SVD."""
    # lazy: heavy (scipy), which this module does not import at its top
    from scipy.sparse import coo_matrix
    # lazy: heavy (sklearn), which this module does not import at its top
    from sklearn.utils.extmath import randomized_svd

    rows, cols = [], []
    for seq in seqs:
        a = np.asarray(seq, dtype=np.int64)
        for d in range(1, window + 1):
            if len(a) > d:
                rows.append(a[:-d])
                cols.append(a[d:])
    if not rows:
        raise LmstackError("the corpus is too short to count co-occurrences")
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = coo_matrix((np.ones(len(r)), (r, c)), shape=(vocab_size, vocab_size))
    m = (m + m.T).tocsr()
    total = m.sum()
    row = np.asarray(m.sum(axis=1)).ravel()
    m = m.tocoo()
    pmi = np.log(m.data * total / (row[m.row] * row[m.col]))
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (m.row[keep], m.col[keep])), shape=m.shape).tocsr()
    k = max(1, min(dim, vocab_size - 1))
    u, s, _ = randomized_svd(ppmi, n_components=k, random_state=seed)
    emb = u * np.sqrt(s)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def cluster_tokens(tok: Tokenizer, texts: list[str], n_remove: int, min_count: int = 5, dim: int = 32,
                   seed: int = 0) -> dict[int, int]:
    """Map each token id to its cluster representative (the smallest id of its cluster)."""
    seqs = tok.encode_batch(texts)
    counts = Counter(i for s in seqs for i in s)
    emb = svd_embeddings(seqs, tok.vocab_size, dim, seed=seed)
    frequent = np.array(sorted(i for i, c in counts.items() if c >= min_count and i not in tok.special_ids))
    if len(frequent) < 2 or n_remove < 1:
        raise LmstackError(f"nothing to cluster: {len(frequent)} frequent tokens, n_remove={n_remove}")
    e = emb[frequent]
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    # Candidate pairs: each token with its nearest neighbour, most similar first.
    nn_idx = sim.argmax(axis=1)
    pairs = sorted(((sim[i, j], i, j) for i, j in enumerate(nn_idx)), reverse=True)
    parent = list(range(len(frequent)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    removed = 0
    for _, i, j in pairs:
        if removed >= n_remove:
            break
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
            removed += 1
    mapping = {i: i for i in range(tok.vocab_size)}
    for k, i in enumerate(frequent):
        mapping[int(i)] = int(frequent[find(k)])
    return mapping


def _bigram_logp(train: list[list[int]], test: list[list[int]], vocab: int, lam: float = 0.7):
    uni, bi, ctx = Counter(), Counter(), Counter()
    for s in train:
        uni.update(s)
        pairs = list(zip([-1] + s, s))
        bi.update(pairs)
        ctx.update(a for a, _ in pairs)
    total = sum(uni.values())
    out = []
    for s in test:
        lp = []
        for a, b in zip([-1] + s, s):
            p = lam * (bi[(a, b)] / ctx[a] if ctx[a] else 0.0) + (1 - lam) * (uni[b] + 1) / (total + vocab)
            lp.append(math.log(p))
        out.append(lp)
    return out, uni


def perplexity_cost(tok: Tokenizer, train_texts: list[str], test_texts: list[str], mapping: dict[int, int]
                    ) -> dict:
    """Held-out per-token perplexity: token bigram LM vs the class-based LM of the clustered vocabulary."""
    train, test = tok.encode_batch(train_texts), tok.encode_batch(test_texts)
    n = sum(map(len, test))
    tok_lp, _ = _bigram_logp(train, test, tok.vocab_size)
    ctrain = [[mapping[i] for i in s] for s in train]
    ctest = [[mapping[i] for i in s] for s in test]
    n_classes = len(set(mapping.values()))
    cls_lp, _ = _bigram_logp(ctrain, ctest, n_classes)
    # Emission P(w | class(w)), add-one smoothed within the class.
    wc = Counter(i for s in train for i in s)
    cc: Counter = Counter()
    members: Counter = Counter(mapping.values())
    for w, c in wc.items():
        cc[mapping[w]] += c
    total_cls = sum(sum(lp) for lp in cls_lp)
    emit = sum(math.log((wc[w] + 1) / (cc[mapping[w]] + members[mapping[w]])) for s in test for w in s)
    total_tok = sum(sum(lp) for lp in tok_lp)
    ppl_tok = math.exp(-total_tok / n)
    ppl_cls = math.exp(-(total_cls + emit) / n)
    return {"vocab_before": tok.vocab_size, "vocab_after": n_classes, "ids_removed": tok.vocab_size - n_classes,
            "ppl_tokens": ppl_tok, "ppl_clusters": ppl_cls, "ppl_cost": ppl_cls / ppl_tok - 1.0, "test_tokens": n}
