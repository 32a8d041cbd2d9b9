"""Self-supervised data labelling: self-training the quality classifier on its confident guesses.

Start from a small labelled set, train the hashed n-gram classifier, then repeat for `rounds`:
predict the unlabelled pool, take the documents it is confident about (P >= confidence as
positive, P <= 1 - confidence as negative; at most `max_per_round` per class, most confident
first, so one class cannot flood the training set), add them with their predicted labels, retrain.
Precision and recall on a held-out labelled split are reported before and after, with the
accuracy of the pseudo-labels when the true labels of the pool are known.

Usage:
    from lmstack.data.selflabel import self_train
    result = self_train(texts, labels, unlabelled, heldout_texts, heldout_labels, confidence=0.9)
    result["before"]["f1"], result["after"]["f1"], result["pseudo_labelled"]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lmstack.data.filters.classifier import ClassifierConfig, HashedNgramClassifier, binary_metrics
from lmstack.errors import LmstackError


def self_train(texts: list[str], labels: list[int], unlabelled: list[str], heldout_texts: list[str],
               heldout_labels: list[int], confidence: float = 0.9, rounds: int = 3, max_per_round: int = 1000,
               cfg: ClassifierConfig | None = None, pool_labels: list[int] | None = None,
               threshold: float = 0.5) -> dict[str, Any]:
    """Self-train; return metrics before/after, per-round counts and the final classifier."""
    if not 0.5 < confidence < 1.0:
        raise LmstackError(f"confidence={confidence} must be in (0.5, 1)")
    if rounds < 1 or max_per_round < 1:
        raise LmstackError("rounds and max_per_round must be >= 1")
    train_x, train_y = list(texts), list(labels)
    clf = HashedNgramClassifier(cfg).fit(train_x, train_y)

    def evaluate(model: HashedNgramClassifier) -> dict[str, float]:
        return binary_metrics(heldout_labels, model.predict_proba(heldout_texts) >= threshold)

    before = evaluate(clf)
    pool = np.arange(len(unlabelled))
    history, correct, added = [], 0, 0
    for r in range(rounds):
        if pool.size == 0:
            break
        p = clf.predict_proba([unlabelled[i] for i in pool])
        pos = np.flatnonzero(p >= confidence)
        neg = np.flatnonzero(p <= 1 - confidence)
        pos = pos[np.argsort(-p[pos])][:max_per_round]
        neg = neg[np.argsort(p[neg])][:max_per_round]
        chosen = np.concatenate([pos, neg])
        if chosen.size == 0:
            history.append({"round": r + 1, "added": 0})
            break
        guesses = [1] * len(pos) + [0] * len(neg)
        for j, y in zip(chosen.tolist(), guesses):
            train_x.append(unlabelled[pool[j]])
            train_y.append(y)
            if pool_labels is not None:
                correct += int(pool_labels[pool[j]] == y)
        added += len(chosen)
        pool = np.delete(pool, chosen)
        clf = HashedNgramClassifier(cfg).fit(train_x, train_y)
        history.append({"round": r + 1, "added": int(len(chosen)), "positive": int(len(pos)),
                        "heldout": evaluate(clf)})
    result: dict[str, Any] = {"before": before, "after": evaluate(clf), "pseudo_labelled": added,
                              "labelled": len(texts), "rounds": history, "classifier": clf}
    if pool_labels is not None and added:
        result["pseudo_label_accuracy"] = round(correct / added, 4)
    return result
