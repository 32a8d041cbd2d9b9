import random

import numpy as np
import pytest

from lmstack.data.dedup import DedupConfig, Deduplicator, dedup_batch
from lmstack.data.dedup.exact import ExactIndex, exact_hashes
from lmstack.data.dedup.minhash import MinHashConfig, MinHasher, MinHashLSH, jaccard_estimate
from lmstack.data.dedup.shingles import batch_shingle_hashes, normalize, shingle_hashes
from lmstack.data.dedup.simhash import SimHashConfig, SimHasher, SimHashIndex, hamming
from lmstack.data.document import make_doc

VOCAB = [f"w{i}" for i in range(3000)]


def random_doc(rng, lo=80, hi=250):
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))


def edit(text, rate, rng):
    """Delete, substitute or insert about `rate` of the words."""
    out = []
    for w in text.split():
        u = rng.random()
        if u < rate / 3:
            continue
        if u < 2 * rate / 3:
            out.append(rng.choice(VOCAB))
        elif u < rate:
            out += [w, rng.choice(VOCAB)]
        else:
            out.append(w)
    return " ".join(out)


def planted_corpus(n_base=300, n_dup=100, rate=0.015, seed=0):
    """Unrelated documents plus near-copies; returns texts and the set of planted (original, copy) pairs."""
    rng = random.Random(seed)
    texts = [random_doc(rng) for _ in range(n_base)]
    pairs = set()
    for _ in range(n_dup):
        src = rng.randrange(n_base)
        pairs.add((src, len(texts)))
        texts.append(edit(texts[src], rate, rng))
    return texts, pairs


def true_jaccard(a, b, k=5):
    A, B = set(shingle_hashes(a, k).tolist()), set(shingle_hashes(b, k).tolist())
    return len(A & B) / len(A | B)


def test_normalize_and_exact():
    assert normalize("Hello,  WORLD!\n") == normalize("hello world") == "hello world"
    idx = ExactIndex()
    reps = idx.add(exact_hashes(["Hello, world!", "something else", "hello world", "HELLO WORLD."]))
    assert reps.tolist() == [-1, -1, 0, 0]
    assert len(set(exact_hashes(["a b", "a c"]).tolist())) == 2


def test_shingles_batch_equals_single():
    texts = ["one two three four five six seven", "short", "", "!!!", "a b c d e f g h i j k"] * 3
    flat, counts = batch_shingle_hashes(texts, 5)
    assert counts.tolist() == [len(shingle_hashes(t, 5)) for t in texts]
    assert np.array_equal(flat, np.concatenate([shingle_hashes(t, 5) for t in texts]))
    assert len(shingle_hashes("", 5)) == 1 and len(shingle_hashes("a b", 5)) == 1
    assert len(set(shingle_hashes("word " * 20, 1).tolist())) == 1


def test_minhash_estimates_jaccard_and_is_batch_independent():
    rng = random.Random(1)
    hasher = MinHasher(MinHashConfig(num_perm=256))
    base = [random_doc(rng) for _ in range(6)]
    texts = base + [edit(t, r, rng) for t, r in zip(base, [0.01, 0.03, 0.05, 0.1, 0.2, 0.3])]
    sigs = hasher.signatures(texts)
    assert sigs.dtype == np.uint32 and sigs.shape == (12, 256)
    for i in range(6):
        est = float(jaccard_estimate(sigs[i], sigs[6 + i]))
        assert abs(est - true_jaccard(texts[i], texts[6 + i])) < 0.1
    # A document's signature does not depend on its batch neighbours (block edges, padding).
    alone = np.stack([hasher.signatures([t])[0] for t in texts])
    assert np.array_equal(alone, sigs)
    assert np.array_equal(hasher.signatures(texts[:1]), MinHasher(MinHashConfig(num_perm=256)).signatures(texts[:1]))
    assert not np.array_equal(hasher.signatures(texts[:1]), MinHasher(MinHashConfig(num_perm=256, seed=2)).signatures(texts[:1]))


def test_minhash_lsh_recall_and_precision_on_planted_pairs():
    texts, pairs = planted_corpus()
    lsh = MinHashLSH(MinHashConfig())
    reps = lsh.add(MinHasher(MinHashConfig()).signatures(texts))
    found = {(int(r), i) for i, r in enumerate(reps) if r >= 0}
    recall = len(found & pairs) / len(pairs)
    assert recall >= 0.95
    assert found <= pairs  # no unrelated document is called a duplicate
    assert all(reps[i] == -1 for i in range(300))


def test_simhash_planted_pairs():
    texts, pairs = planted_corpus(rate=0.015, seed=3)
    fps = SimHasher(SimHashConfig()).signatures(texts)
    assert fps.dtype == np.uint64
    near = [hamming(int(fps[a]), int(fps[b])) for a, b in pairs]
    far = [hamming(int(fps[i]), int(fps[i + 1])) for i in range(200)]
    assert np.median(near) <= 6 and min(far) > 16
    reps = SimHashIndex(SimHashConfig()).add(fps)
    found = {(int(r), i) for i, r in enumerate(reps) if r >= 0}
    assert len(found & pairs) / len(pairs) >= 0.9 and found <= pairs


def test_deduplicator_streaming_clusters_and_persistence(tmp_path):
    texts, pairs = planted_corpus(n_base=100, n_dup=40, seed=5)
    docs = [make_doc(t, f"d{i}", "s") for i, t in enumerate(texts)]
    docs.append(make_doc(texts[3].upper() + " !", "exact-copy", "s"))
    whole = dedup_batch(docs, DedupConfig())
    dd = Deduplicator(DedupConfig())
    kept = []
    for i in range(0, len(docs), 17):
        batch = docs[i:i + 17]
        kept += dd.apply(batch, dd.signatures(batch)).kept
    assert [d["id"] for d in kept] == [d["id"] for d in whole.kept]
    # Every planted copy goes (unedited copies as exact duplicates), plus the case/punctuation copy of d3.
    dropped = {d["id"]: r for d, r in whole.dropped}
    assert set(dropped) == {f"d{b}" for _, b in pairs} | {"exact-copy"}
    assert dropped["exact-copy"] == "exact_duplicate"
    clusters = dd.clusters()
    assert clusters["exact"]["duplicates"] == whole.reasons()["exact_duplicate"]
    assert clusters["minhash"]["duplicates"] == whole.reasons()["near_duplicate"] > 30
    assert any(dd.exact.ids[rep] == "d3" and "exact-copy" in m for rep, m in dd.exact.members.items())
    assert len(clusters["exact"]["largest"]) == min(5, clusters["exact"]["clusters"])
    dd.save(tmp_path / "dd")
    again = Deduplicator.load(tmp_path / "dd")
    new = [make_doc(texts[7], "again-exact", "s"), make_doc(edit(texts[8], 0.02, random.Random(9)), "again-near", "s"),
           make_doc(random_doc(random.Random(10)), "fresh", "s")]
    res = again.apply(new, again.signatures(new))
    assert [d["id"] for d in res.kept] == ["fresh"]
    assert sorted(r for _, r in res.dropped) == ["exact_duplicate", "near_duplicate"]


def test_simhash_method_and_config_errors():
    texts, pairs = planted_corpus(n_base=60, n_dup=20, rate=0.01, seed=6)
    docs = [make_doc(t, str(i), "s") for i, t in enumerate(texts)]
    res = dedup_batch(docs, DedupConfig(exact=False, near="simhash"))
    assert res.reasons()["near_duplicate"] >= 18
    assert "meta" in docs[0] and len(docs) == 80  # the input batch is not modified
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashConfig(bands=20, rows=8)
    with pytest.raises(ValueError, match="max_distance"):
        SimHashConfig(max_distance=20)
