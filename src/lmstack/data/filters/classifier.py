"""A trainable quality classifier: hashed n-gram features + logistic regression (fastText-style).

This is the "human annotation -> classifier" technique: label a few hundred documents good/bad,
train, then filter a large corpus by the predicted probability (GPT-3 and CCNet did this with
fastText against a reference corpus). Features are hashed word 1-2-grams plus character 3-5-grams
(inside word boundaries), so the model is a fixed-size weight vector and needs no vocabulary.

Choices: scikit-learn's HashingVectorizer (stateless murmurhash3, identical in every process) and
LogisticRegression fit the model; we save only the weights (weights.npy) and the feature settings
(classifier.json), never a pickle, and predict with our own sparse dot product.

Labelled files are JSONL ({"text": ..., "label": "good"|"bad"|1|0}) or fastText lines
("__label__good some text").

Usage:
    from lmstack.data.filters.classifier import HashedNgramClassifier, train_classifier
    clf = HashedNgramClassifier().fit(texts, labels)      # labels: 1 = positive class
    clf.save("quality_model/"); clf = HashedNgramClassifier.load("quality_model/")
    p = clf.predict_proba(["some text"])                  # probability of the positive class
    metrics = train_classifier("labelled.jsonl", out="quality_model/")   # P/R on a held-out split
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmstack.config import atomic_write_text, from_dict, to_dict
from lmstack.data.document import Doc, StepResult
from lmstack.errors import LmstackError


@dataclass
class ClassifierConfig:
    """Features and regularisation of the hashed n-gram logistic regression."""

    n_features: int = 2**18
    """Hash buckets per feature family (word n-grams and char n-grams each get this many)."""
    word_ngrams: list[int] = field(default_factory=lambda: [1, 2])
    """Smallest and largest word n-gram."""
    char_ngrams: list[int] = field(default_factory=lambda: [3, 5])
    """Smallest and largest character n-gram (within word boundaries); [] disables them."""
    C: float = 4.0
    """Inverse L2 regularisation strength of the logistic regression."""
    balanced: bool = True
    """Weight classes inversely to their frequency (helps when 'bad' examples are rare)."""

    def __post_init__(self) -> None:
        for name in ("word_ngrams", "char_ngrams"):
            v = getattr(self, name)
            if v and (len(v) != 2 or v[0] < 1 or v[0] > v[1]):
                raise ValueError(f"classifier.{name}={v} must be [min, max] with 1 <= min <= max")
        if self.n_features < 16 or self.C <= 0:
            raise ValueError("classifier.n_features must be >= 16 and classifier.C > 0")


class HashedNgramClassifier:
    """Binary logistic regression on hashed n-grams. `predict_proba` gives P(label == 1)."""

    def __init__(self, cfg: ClassifierConfig | None = None) -> None:
        self.cfg = cfg or ClassifierConfig()
        self.weights: np.ndarray | None = None
        self.bias = 0.0

    def _vectorizers(self) -> list:
        # lazy: heavy (sklearn), which this module does not import at its top
        from sklearn.feature_extraction.text import HashingVectorizer

        vecs = [HashingVectorizer(analyzer="word", ngram_range=tuple(self.cfg.word_ngrams), n_features=self.cfg.n_features,
                                  alternate_sign=False, norm=None, lowercase=True)]
        if self.cfg.char_ngrams:
            vecs.append(HashingVectorizer(analyzer="char_wb", ngram_range=tuple(self.cfg.char_ngrams),
                                          n_features=self.cfg.n_features, alternate_sign=False, norm=None, lowercase=True))
        return vecs

    def featurize(self, texts: list[str]):
        """Sparse (n, features) matrix: log-scaled counts, each row L2-normalised."""
        # lazy: heavy (scipy), which this module does not import at its top
        import scipy.sparse as sp
        # lazy: heavy (sklearn), which this module does not import at its top
        from sklearn.preprocessing import normalize

        X = sp.hstack([v.transform(texts) for v in self._vectorizers()]).tocsr()
        X.data = np.log1p(X.data)  # dampen repeated n-grams, as fastText's averaging does
        return normalize(X)

    def fit(self, texts: list[str], labels: list[int] | np.ndarray) -> "HashedNgramClassifier":
        # lazy: heavy (sklearn), which this module does not import at its top
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(y):
            raise LmstackError(f"classifier: {len(texts)} texts but {len(y)} labels")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise LmstackError("classifier: training needs examples of both classes (labels 0 and 1)")
        model = LogisticRegression(C=self.cfg.C, class_weight="balanced" if self.cfg.balanced else None,
                                   max_iter=2000, solver="liblinear")
        model.fit(self.featurize(texts), y)
        self.weights = model.coef_.ravel().astype(np.float32)
        self.bias = float(model.intercept_[0])
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if self.weights is None:
            raise LmstackError("classifier is not trained: call fit() or load() first")
        z = self.featurize(texts) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    def save(self, path: str | Path) -> None:
        if self.weights is None:
            raise LmstackError("classifier is not trained; nothing to save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".weights.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, self.weights, allow_pickle=False)
        tmp.replace(path / "weights.npy")
        atomic_write_text(path / "classifier.json", json.dumps({"config": to_dict(self.cfg), "bias": self.bias}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "HashedNgramClassifier":
        path = Path(path)
        try:
            meta = json.loads((path / "classifier.json").read_text(encoding="utf-8"))
            weights = np.load(path / "weights.npy", allow_pickle=False)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise LmstackError(f"cannot load a classifier from {path}: {e}") from None
        clf = cls(from_dict(ClassifierConfig, meta["config"]))
        expected = clf.cfg.n_features * (2 if clf.cfg.char_ngrams else 1)
        if weights.shape != (expected,):
            raise LmstackError(f"{path}/weights.npy has shape {weights.shape}, expected ({expected},)")
        clf.weights, clf.bias = weights, float(meta["bias"])
        return clf


def binary_metrics(y_true: np.ndarray | list[int], y_pred: np.ndarray | list[int]) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of the positive class (label 1)."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = int((y_true & y_pred).sum())
    precision = tp / max(int(y_pred.sum()), 1)
    recall = tp / max(int(y_true.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "accuracy": round(float((y_true == y_pred).mean()) if len(y_true) else 0.0, 4), "n": int(len(y_true))}


def _label_value(raw: Any, positive: str, where: str) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return int(raw)
    if isinstance(raw, str):
        return int(raw.strip().lower() == positive)
    raise LmstackError(f"{where}: label {raw!r} must be 0/1, true/false or a class name")


def load_labelled(path: str | Path, positive: str = "good") -> tuple[list[str], list[int]]:
    """(texts, labels) from a JSONL file ({"text", "label"}) or fastText lines ('__label__good text').

    String labels equal to `positive` become 1, every other string 0. Malformed lines raise, naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmstackError(f"cannot read labelled file {path}: {e}") from None
    texts, labels = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        if line.startswith("__label__"):
            label, _, text = line.partition(" ")
            labels.append(_label_value(label[len("__label__"):], positive, where))
            texts.append(text)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise LmstackError(f"{where}: neither JSON nor a '__label__<name> text' line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or "label" not in rec:
            raise LmstackError(f"{where}: a labelled record needs a string 'text' and a 'label'")
        texts.append(rec["text"])
        labels.append(_label_value(rec["label"], positive, where))
    if not texts:
        raise LmstackError(f"labelled file {path} holds no examples")
    return texts, labels


def split_heldout(n: int, fraction: float, seed: int, labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, heldout); stratified by label when labels are given."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout fraction={fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(np.asarray(labels) == c) for c in (0, 1)]
    train, held = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_classifier(labelled: str | Path, out: str | Path, positive: str = "good", heldout: float = 0.2,
                     seed: int = 0, cfg: ClassifierConfig | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """Train on a labelled file, report precision/recall on a held-out split, save the model to `out`."""
    texts, labels = load_labelled(labelled, positive)
    train_idx, held_idx = split_heldout(len(texts), heldout, seed, labels)
    clf = HashedNgramClassifier(cfg).fit([texts[i] for i in train_idx], [labels[i] for i in train_idx])
    p = clf.predict_proba([texts[i] for i in held_idx])
    metrics = binary_metrics([labels[i] for i in held_idx], p >= threshold)
    clf.save(out)
    return {"train": int(len(train_idx)), "heldout": metrics, "out": str(out)}


@dataclass
class ClassifierFilterConfig:
    """Filter with a trained classifier (see `lmstack data train-classifier`)."""

    enabled: bool = False
    """Run this filter (needs `model`)."""
    model: str = ""
    """Directory holding classifier.json + weights.npy."""
    threshold: float = 0.5
    """Decision threshold on P(positive class)."""
    keep: Literal["positive", "negative"] = "positive"
    """Which predicted class survives: 'positive' for a good-vs-bad quality model."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"classifier.threshold={self.threshold} must be in [0, 1]")
        if self.enabled and not self.model:
            raise ValueError("classifier.model must name a trained classifier directory when enabled")


class ClassifierFilter:
    """Annotate meta['quality_p']; drop documents of the unwanted class (reason 'classifier')."""

    def __init__(self, cfg: ClassifierFilterConfig) -> None:
        self.cfg = cfg
        self.clf = HashedNgramClassifier.load(cfg.model)

    def __call__(self, batch: list[Doc]) -> StepResult:
        if not batch:
            return StepResult([], [])
        p = self.clf.predict_proba([d["text"] for d in batch])
        kept, dropped = [], []
        for doc, prob in zip(batch, p):
            doc = {**doc, "meta": {**doc["meta"], "quality_p": round(float(prob), 4)}}
            positive = prob >= self.cfg.threshold
            if positive == (self.cfg.keep == "positive"):
                kept.append(doc)
            else:
                dropped.append((doc, "classifier"))
        return StepResult(kept, dropped)
