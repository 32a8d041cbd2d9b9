import random
from collections import Counter

import numpy as np
import pytest

from lmstack.data.mixing import (AdaptiveWeights, MixConfig, achieved_shares, entropy, mixture_copies,
                                 mixture_weights, temperature_shares)
from lmstack.data.topics import TopicConfig, TopicModel, balanced_shares
from lmstack.errors import LmstackError


def test_temperature_shares():
    counts = {"en": 900, "fr": 90, "sw": 10}
    assert temperature_shares(counts, 1.0) == pytest.approx({"en": 0.9, "fr": 0.09, "sw": 0.01})
    t2 = temperature_shares(counts, 2.0)
    assert t2["en"] == pytest.approx(30 / (30 + 90 ** 0.5 + 10 ** 0.5))
    flat = temperature_shares(counts, 1000.0)
    assert max(flat.values()) - min(flat.values()) < 0.01
    assert t2["sw"] > 0.01 and entropy(t2) > entropy(temperature_shares(counts, 1.0))
    with pytest.raises(ValueError):
        temperature_shares(counts, 0)


def test_mixture_hits_target_source_shares():
    sources = ["web"] * 8000 + ["books"] * 1500 + ["code"] * 500
    cfg = MixConfig(weights={"web": 0.5, "books": 0.3, "code": 0.2}, seed=1)
    copies = mixture_copies({"source": sources}, cfg)
    shares = achieved_shares(sources, copies)
    assert shares == pytest.approx({"web": 0.5, "books": 0.3, "code": 0.2}, abs=0.015)
    assert abs(int(copies.sum()) - 10000) < 150
    assert copies[:8000].max() <= 1 and copies[-500:].min() >= 3  # web downsampled, code repeated ~4x
    assert np.array_equal(copies, mixture_copies({"source": sources}, cfg))  # deterministic given the seed


def test_max_repeat_total_and_language_temperature():
    sources = ["a"] * 990 + ["b"] * 10
    capped = mixture_copies({"source": sources}, MixConfig(weights={"a": 0.5, "b": 0.5}, max_repeat=3))
    assert capped[990:].max() <= 4 and capped[990:].sum() <= 40
    assert mixture_copies({"source": sources}, MixConfig(total_docs=500)).sum() == pytest.approx(500, abs=40)
    langs = ["en"] * 900 + ["fr"] * 100
    copies = mixture_copies({"source": ["x"] * 1000, "lang": langs}, MixConfig(language_temperature=3.0, seed=2))
    want = temperature_shares({"en": 900, "fr": 100}, 3.0)
    assert achieved_shares(langs, copies)["fr"] == pytest.approx(want["fr"], abs=0.03)
    with pytest.raises(LmstackError, match="no weight for source"):
        mixture_weights({"source": ["a", "c"]}, MixConfig(weights={"a": 1.0}))
    with pytest.raises(ValueError, match="language_temperature"):
        MixConfig(language_temperature=0)


def test_adaptive_weights_move_towards_excess_loss():
    aw = AdaptiveWeights(["web", "code", "math"], lr=0.5)
    before = aw.weights
    assert before == pytest.approx({"web": 1 / 3, "code": 1 / 3, "math": 1 / 3})
    after = aw.update({"web": 3.0, "code": 2.5, "math": 4.0}, {"web": 3.0, "code": 2.0, "math": 2.0})
    # math has the largest excess loss (2.0), code some (0.5), web none (0.0).
    assert after["math"] > after["code"] > after["web"]
    assert after["math"] > before["math"] and after["web"] < before["web"]
    assert sum(after.values()) == pytest.approx(1.0)
    for _ in range(50):  # a source that is already learned (loss below reference) never gains weight
        w = aw.update({"web": 2.0, "code": 2.5, "math": 4.0}, {"web": 3.0, "code": 2.0, "math": 2.0})
    assert w["math"] > 0.99 - 2 * aw.smoothing and w["web"] >= aw.smoothing / 3
    state = aw.state_dict()
    fresh = AdaptiveWeights(["web", "code", "math"])
    fresh.load_state_dict(state)
    assert fresh.weights == pytest.approx(w)
    draws = Counter(fresh.sample(1000, np.random.default_rng(0)))
    assert draws["math"] > 950
    with pytest.raises(LmstackError, match="no loss"):
        aw.update({"web": 1.0}, {"web": 1.0})


TOPIC_WORDS = {
    "sport": "football match goal team player coach league score stadium season".split(),
    "cook": "recipe oven flour sugar butter bake dough kitchen pan taste".split(),
    "space": "planet orbit rocket star galaxy telescope astronaut moon launch gravity".split(),
}


def topic_docs(counts, seed=0):
    rng = random.Random(seed)
    texts, labels = [], []
    for topic, n in counts.items():
        for _ in range(n):
            texts.append(" ".join(rng.choice(TOPIC_WORDS[topic]) for _ in range(30)))
            labels.append(topic)
    return texts, labels


def test_topic_model_recovers_topics_and_balances():
    texts, truth = topic_docs({"sport": 300, "cook": 60, "space": 40})
    model = TopicModel(TopicConfig(enabled=True, n_topics=3)).fit(texts)
    pred = model.predict(texts)
    # Each true topic maps to one cluster (purity 1).
    for topic in TOPIC_WORDS:
        assert len({int(p) for p, t in zip(pred, truth) if t == topic}) == 1
    terms = model.top_terms(3)
    assert any(set(t) <= set(TOPIC_WORDS["space"]) for t in terms)
    assert balanced_shares({0: 300, 1: 60, 2: 40}, 1.0) == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    assert balanced_shares({0: 300, 1: 100}, 0.0) == pytest.approx({0: 0.75, 1: 0.25})
    cfg = MixConfig(topics=TopicConfig(enabled=True, n_topics=3, strength=1.0))
    copies = mixture_copies({"source": ["s"] * len(texts), "topic": pred.tolist()}, cfg)
    after = achieved_shares(pred.tolist(), copies)
    assert max(after.values()) - min(after.values()) < 0.06  # from 75% / 15% / 10% to about a third each
    with pytest.raises(ValueError, match="strength"):
        TopicConfig(strength=2.0)
