"""rag/bm25.py: hand-computed scores, equality with bm25s, incremental add/remove, bad input."""
import math
import random

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag.bm25 import BM25, tokenize
from lmstack.world import World
from lmstack.world.bios import paraphrase_bio


def _w(tf, dl, df, n=3, avgdl=8 / 3, k1=1.5, b=0.75):
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))


def test_scores_on_a_hand_computed_three_document_example():
    bm = BM25(stopwords=None)
    bm.add(["d1", "d2", "d3"], ["cat sat mat", "cat cat dog", "dog bird"])
    # N = 3, avgdl = 8/3; idf(cat) = idf(dog) = ln(1 + 1.5/2.5) = ln 1.6, idf(bird) = ln(1 + 2.5/1.5)
    # d1: tf(cat)=1, |d|=3 -> ln1.6 * 1 / (1 + 1.5 * (0.25 + 0.75 * 9/8)) = 0.470004 / 2.640625 = 0.177989
    # d2: tf(cat)=2, |d|=3 -> ln1.6 * 2 / (2 + 1.640625) = 0.258199
    assert bm.scores("cat") == pytest.approx({"d1": 0.177989, "d2": 0.258199}, abs=1e-5)
    assert bm.scores("cat")["d1"] == pytest.approx(_w(1, 3, 2), rel=1e-6)
    assert bm.scores("cat")["d2"] == pytest.approx(_w(2, 3, 2), rel=1e-6)
    # d3: dog (tf 1, df 2) + bird (tf 1, df 1), |d| = 2: (ln1.6 + ln(8/3)) / (1 + 1.5 * (0.25 + 0.75 * 0.75))
    s = bm.scores("dog bird")
    assert s["d3"] == pytest.approx((0.470004 + 0.980829) / 2.21875, abs=1e-5)
    assert s["d2"] == pytest.approx(_w(1, 3, 2), rel=1e-6) and "d1" not in s
    assert bm.search("dog bird", k=5) == [("d3", pytest.approx(s["d3"])), ("d2", pytest.approx(s["d2"]))]
    assert bm.search("dog bird", k=1)[0][0] == "d3"
    assert bm.scores("unicorn") == {} and bm.search("unicorn", k=3) == []


def test_k1_and_b_change_the_scores():
    docs = ["cat cat cat cat", "cat dog dog dog dog dog dog dog"]
    base = BM25(stopwords=None)
    flat = BM25(k1=0.0, stopwords=None)       # k1 = 0: term frequency ignored, only idf
    nolen = BM25(b=0.0, stopwords=None)       # b = 0: no length normalisation
    for bm in (base, flat, nolen):
        bm.add(["a", "b"], docs)
    assert flat.scores("cat")["a"] == pytest.approx(flat.scores("cat")["b"])
    assert base.scores("cat")["a"] > nolen.scores("cat")["a"] > nolen.scores("cat")["b"]
    assert base.scores("cat")["b"] < nolen.scores("cat")["b"]   # the long document is penalised by b


def _bios(n_people=60, seed=0):
    world = World(seed=0)
    rng = random.Random(seed)
    people = world.people[:n_people]
    return [f"bio{i}" for i in range(len(people))], [paraphrase_bio(p, rng, world) for p in people], people


def test_scores_equal_bm25s_on_world_bios():
    bm25s = pytest.importorskip("bm25s")
    ids, texts, people = _bios()
    ours = BM25()
    ours.add(ids, texts)
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index([tokenize(t) for t in texts], show_progress=False)
    queries = [f"Where was {p.name} born?" for p in people[:10]] + ["engineer university", "born born city"]
    for q in queries:
        expected = ref.get_scores(tokenize(q))
        got = ours.scores(q)
        dense = np.array([got.get(i, 0.0) for i in ids])
        np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-5)
    assert ours.search(queries[0], k=1)[0][0] == "bio0"


def test_incremental_add_and_remove_equal_a_fresh_index():
    ids, texts, _ = _bios(40, seed=1)
    grown = BM25()
    grown.add(ids[:10], texts[:10])
    assert grown.search("born", k=3)          # builds the matrix, so the next add must invalidate it
    grown.add(ids[10:], texts[10:])
    assert grown.remove(ids[5:35]) == 30 and grown.remove(["nope"]) == 0
    keep = ids[:5] + ids[35:]
    fresh = BM25()
    fresh.add(keep, texts[:5] + texts[35:])
    assert len(grown) == len(fresh) == 10 and "bio6" not in grown and "bio36" in grown
    for q in ("born city university", texts[36][:60], "works for"):
        assert grown.scores(q) == pytest.approx(fresh.scores(q), rel=1e-5)
        assert [d for d, _ in grown.search(q, 4)] == [d for d, _ in fresh.search(q, 4)]
    grown.add(["bio6"], [texts[6]])           # a removed id may come back
    assert "bio6" in grown.scores(texts[6][:40])


def test_tokenize_and_bad_input():
    assert tokenize("Where was Ada's FATHER born, in 1971?") == ["ada", "father", "born", "1971"]
    assert tokenize("The cat", stopwords=None) == ["the", "cat"]
    bm = BM25()
    bm.add(["a"], ["text"])
    with pytest.raises(LmstackError, match="already holds a document with id 'a'"):
        bm.add(["a"], ["again"])
    with pytest.raises(LmstackError, match="2 ids for 1 texts"):
        bm.add(["x", "y"], ["one"])
    with pytest.raises(LmstackError, match="k1"):
        BM25(k1=-1)
    with pytest.raises(LmstackError, match="b must be"):
        BM25(b=2)
    with pytest.raises(LmstackError, match="k must be"):
        bm.search("text", k=0)
    assert BM25().search("anything", k=3) == []
