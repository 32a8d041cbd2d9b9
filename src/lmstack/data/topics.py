"""Topic modelling for balanced representation: TF-IDF + k-means clusters, and balancing factors.

Web-scale corpora are lopsided (a few topics dominate). We cluster documents into `n_topics`
topics with scikit-learn (TF-IDF vectors, k-means), report the topic distribution with each
topic's top terms, and give the mixer a target distribution p_k proportional to n_k^(1 - strength):
strength 0 keeps the natural mix, 1 makes every topic equally likely, values between flatten it
(the same form as temperature sampling across languages).

Usage:
    from lmstack.data.topics import TopicConfig, TopicModel, balanced_shares
    model = TopicModel(TopicConfig(n_topics=4)).fit(texts)
    labels = model.predict(texts)                   # int array
    model.top_terms(5)                              # [['war', 'king', ...], ...]
    balanced_shares({0: 900, 1: 100}, strength=1.0) # {0: 0.5, 1: 0.5}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmstack.errors import LmstackError


@dataclass
class TopicConfig:
    """Topic clustering and how strongly the mixer rebalances topics."""

    enabled: bool = False
    """Cluster documents into topics (report + rebalancing)."""
    n_topics: int = 8
    """Number of k-means clusters."""
    strength: float = 0.5
    """0 = report only (natural mix), 1 = uniform over topics; target share ~ n_k^(1 - strength)."""
    max_fit_docs: int = 5000
    """Fit TF-IDF and k-means on at most this many documents (a uniform sample); all are labelled."""
    max_features: int = 20000
    """TF-IDF vocabulary size."""
    seed: int = 0
    """Seed for the sample and k-means."""

    def __post_init__(self) -> None:
        if self.n_topics < 2:
            raise ValueError(f"topics.n_topics={self.n_topics} must be >= 2")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"topics.strength={self.strength} must be in [0, 1]")


class TopicModel:
    """TF-IDF (English stop words removed, sublinear tf) + k-means; fit once, label any text."""

    def __init__(self, cfg: TopicConfig) -> None:
        self.cfg = cfg
        self.vectorizer = None
        self.kmeans = None

    def fit(self, texts: list[str]) -> "TopicModel":
        # lazy: heavy (sklearn), which this module does not import at its top
        from sklearn.cluster import KMeans
        from sklearn.feature_extraction.text import TfidfVectorizer

        if len(texts) < self.cfg.n_topics:
            raise LmstackError(f"topic model: {len(texts)} documents cannot form {self.cfg.n_topics} topics")
        self.vectorizer = TfidfVectorizer(max_features=self.cfg.max_features, stop_words="english",
                                          sublinear_tf=True, min_df=2 if len(texts) >= 50 else 1)
        X = self.vectorizer.fit_transform(texts)
        self.kmeans = KMeans(n_clusters=self.cfg.n_topics, n_init=3, random_state=self.cfg.seed).fit(X)
        return self

    def predict(self, texts: list[str]) -> np.ndarray:
        if self.kmeans is None:
            raise LmstackError("topic model is not fitted")
        return self.kmeans.predict(self.vectorizer.transform(texts)).astype(np.int64)

    def top_terms(self, k: int = 8) -> list[list[str]]:
        """The k highest-weighted terms of each cluster centre."""
        terms = self.vectorizer.get_feature_names_out()
        return [[str(terms[j]) for j in np.argsort(-c)[:k]] for c in self.kmeans.cluster_centers_]


def balanced_shares(counts: dict, strength: float) -> dict:
    """Target share per group: n^(1 - strength), normalised (strength 1 -> uniform)."""
    total = sum(n ** (1.0 - strength) for n in counts.values() if n > 0)
    return {k: (n ** (1.0 - strength)) / total if n > 0 else 0.0 for k, n in counts.items()}
