import json
import random

import numpy as np
import pytest

from lmstack.data.document import make_doc
from lmstack.data.filters.classifier import (ClassifierFilter, ClassifierFilterConfig, HashedNgramClassifier,
                                             binary_metrics, load_labelled, split_heldout, train_classifier)
from lmstack.data.filters.toxicity import ToxicityConfig, ToxicityFilter
from lmstack.data.selflabel import self_train
from lmstack.errors import LmstackError

NOUNS = "river farmer village market teacher garden bridge storm harbour library mountain school doctor kitchen".split()
ADJS = "old quiet busy small ancient bright narrow green heavy gentle famous distant warm careful".split()
VERBS = "crossed visited repaired painted described watched followed opened cleaned measured".split()


def fluent(rng):
    return " ".join(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} near "
                    f"the {rng.choice(NOUNS)} before {rng.choice(['noon', 'dawn', 'winter', 'the rain'])}."
                    for _ in range(rng.randint(3, 6)))


def word_salad(rng):
    """The same words as a fluent document, shuffled: only word order tells the classes apart."""
    w = fluent(rng).replace(".", "").split()
    rng.shuffle(w)
    return " ".join(" ".join(w[i:i + 12]).capitalize() + "." for i in range(0, len(w), 12))


def dataset(n, rng):
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.random() < 0.5)
        texts.append(fluent(rng) if y else word_salad(rng))
        labels.append(y)
    return texts, labels


def test_classifier_learns_word_order_and_roundtrips(tmp_path):
    rng = random.Random(0)
    texts, labels = dataset(300, rng)
    held, held_y = dataset(200, rng)
    clf = HashedNgramClassifier().fit(texts, labels)
    p = clf.predict_proba(held)
    m = binary_metrics(held_y, p >= 0.5)
    assert m["precision"] > 0.95 and m["recall"] > 0.95
    clf.save(tmp_path / "m")
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == ["classifier.json", "weights.npy"]
    np.load(tmp_path / "m" / "weights.npy", allow_pickle=False)  # plain array, no pickle inside
    again = HashedNgramClassifier.load(tmp_path / "m")
    assert np.allclose(again.predict_proba(held), p)


def test_binary_metrics_and_split():
    m = binary_metrics([1, 1, 0, 0], [1, 0, 1, 0])
    assert m == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5, "n": 4}
    train, held = split_heldout(100, 0.2, 0, labels=[0] * 50 + [1] * 50)
    assert len(held) == 20 and set(train) | set(held) == set(range(100)) and not set(train) & set(held)
    assert sum(1 for i in held if i >= 50) == 10  # stratified


def test_labelled_file_formats_and_train_classifier(tmp_path):
    rng = random.Random(1)
    texts, labels = dataset(200, rng)
    jsonl = tmp_path / "lab.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": "good" if y else "bad"}) + "\n" for t, y in zip(texts, labels)))
    ft = tmp_path / "lab.txt"
    ft.write_text("".join(f"__label__{'good' if y else 'bad'} {t}\n" for t, y in zip(texts, labels)))
    assert load_labelled(jsonl) == load_labelled(ft) == (texts, labels)
    result = train_classifier(jsonl, tmp_path / "model", heldout=0.25)
    assert result["train"] == 150 and result["heldout"]["n"] == 50
    assert result["heldout"]["f1"] > 0.9
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "good"}\n{"text": 3}\n')
    with pytest.raises(LmstackError, match="bad.jsonl:2"):
        load_labelled(bad)
    with pytest.raises(LmstackError, match="both classes"):
        HashedNgramClassifier().fit(["a", "b"], [1, 1])


def test_classifier_filter_and_toxicity_classifier(tmp_path):
    rng = random.Random(2)
    texts, labels = dataset(200, rng)
    HashedNgramClassifier().fit(texts, labels).save(tmp_path / "q")
    docs = [make_doc(fluent(rng), "good", "s"), make_doc(word_salad(rng), "salad", "s")]
    res = ClassifierFilter(ClassifierFilterConfig(enabled=True, model=str(tmp_path / "q")))(docs)
    assert [d["id"] for d in res.kept] == ["good"] and res.reasons() == {"classifier": 1}
    assert res.kept[0]["meta"]["quality_p"] > 0.5
    # The same model used as a "toxicity" classifier whose positive class is the unwanted one.
    tox = ToxicityFilter(ToxicityConfig(classifier=str(tmp_path / "q"), classifier_threshold=0.5))(docs)
    assert [d["id"] for d in tox.kept] == ["salad"] and tox.reasons() == {"toxic_classifier": 1}
    with pytest.raises(ValueError, match="classifier.model"):
        ClassifierFilterConfig(enabled=True)


def test_self_training_improves_a_small_labelled_set():
    rng = random.Random(0)
    lab = [fluent(rng) for _ in range(10)] + [word_salad(rng) for _ in range(10)]
    lab_y = [1] * 10 + [0] * 10
    pool, pool_y = dataset(600, rng)
    held, held_y = dataset(400, rng)
    r = self_train(lab, lab_y, pool, held, held_y, confidence=0.7, rounds=4, max_per_round=100, pool_labels=pool_y)
    assert r["pseudo_labelled"] > 300
    assert r["pseudo_label_accuracy"] > 0.9
    assert r["after"]["f1"] > r["before"]["f1"] + 0.03, (r["before"], r["after"])
    assert [h["round"] for h in r["rounds"]] == [1, 2, 3, 4]
    with pytest.raises(LmstackError, match="confidence"):
        self_train(lab, lab_y, pool, held, held_y, confidence=0.4)
