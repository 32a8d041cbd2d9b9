"""World data for issue 4 section 1b: quality labels for self-training, and expansion batches."""
from __future__ import annotations

import json

import pytest

from lmstack.world import World, WorldConfig
from lmstack.world.expansion import expansion_batch, write_expansion_batch
from lmstack.world.quality import BAD_KINDS
from lmstack.errors import LmstackError


@pytest.fixture(scope="module")
def world():
    return World(seed=0, size="small")


def test_quality_labels_are_balanced_and_partly_hidden(world):
    recs = world.corpus("quality")
    assert len(recs) == 2000
    assert sum(r["label"] == "good" for r in recs) == 1000
    assert {r["quality_kind"] for r in recs if r["label"] == "bad"} == set(BAD_KINDS)
    train = [r for r in recs if r["split"] == "train"]
    share = sum(r["labelled"] for r in train) / len(train)
    assert 0.15 < share < 0.25
    assert all(r["labelled"] for r in recs if r["split"] != "train")


def test_quality_labels_are_learnable_from_the_labelled_seed_set(world):
    # The seed set (20% of train) must already teach a hashed n-gram classifier the distinction;
    # this is the starting point self-training improves on.
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression

    recs = world.corpus("quality")
    seed = [r for r in recs if r["split"] == "train" and r["labelled"]]
    test = [r for r in recs if r["split"] == "test"]
    vec = HashingVectorizer(ngram_range=(1, 2), n_features=2 ** 18, alternate_sign=False)
    clf = LogisticRegression(max_iter=1000).fit(vec.transform([r["text"] for r in seed]),
                                                [r["label"] == "bad" for r in seed])
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    truth = [r["label"] == "bad" for r in test]
    tp = sum(p and t for p, t in zip(pred, truth))
    precision, recall = tp / max(1, sum(pred)), tp / max(1, sum(truth))
    assert precision > 0.9 and recall > 0.8, (precision, recall)


def _shingles(text: str, k: int = 3) -> set:
    w = text.split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_expansion_batch_plants_what_it_says(world):
    recs = expansion_batch(world, batch=1, n=200)
    counts = {}
    for r in recs:
        counts[r["planted"]] = counts.get(r["planted"], 0) + 1
    assert counts == {"new": 140, "exact_dup": 20, "near_dup": 20, "contaminated": 20}
    existing = {d["id"]: d["text"] for d in world.corpus("pretrain", split="train")}
    held = {r["id"]: r for r in world.corpus("arithmetic", split="test") + world.corpus("qa", split="test")}
    texts = set(existing.values())
    for r in recs:
        assert r["text"] and r["split"] == "train" and r["source"] == "world/expansion/1"
        if r["planted"] == "new":
            assert r["text"] not in texts
        elif r["planted"] == "exact_dup":
            assert r["text"] == existing[r["of"]]
        elif r["planted"] == "near_dup":
            a, b = _shingles(r["text"]), _shingles(existing[r["of"]])
            assert r["text"] != existing[r["of"]] and len(a & b) / len(a | b) > 0.4
        else:
            item = held[r["of"]]
            assert item["question"] in r["text"] and item["split"] == "test"


def test_expansion_batches_are_deterministic_and_distinct(tmp_path):
    w = World(config=WorldConfig(n_people=60, n_stories=100, n_arithmetic=100))
    a, b = expansion_batch(w, 1), expansion_batch(w, 1)
    assert a == b and len(a) == 50
    assert [r["text"] for r in expansion_batch(w, 2)] != [r["text"] for r in a]
    path = tmp_path / "batch_001.jsonl"
    counts = write_expansion_batch(w, path, batch=1)
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == a and sum(counts.values()) == len(lines)
    with pytest.raises(LmstackError, match="batch"):
        expansion_batch(w, 0)
