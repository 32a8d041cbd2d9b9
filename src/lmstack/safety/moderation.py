"""Moderation classifiers behind one interface: per-category probabilities, per-category thresholds, verdicts.

Three moderators share `Moderator`:
- `KeywordModerator` ("keyword"): the plain baseline, no training: a forbidden-brew phrase -> harmful_instructions,
  the data pipeline's toxic word list -> harassment, the PII regexes -> pii; scores are 0 or 1.
- `HashedModerator` (tier 1, "hashed"): the data filters' hashed word + char n-gram features
  (data/filters/classifier.py) with one logistic regression per category (multi-label: one-vs-rest), so it
  costs a sparse dot product per text. Saved as weights.safetensors + moderator.json.
- `EncoderModerator` (tier 2, "encoder", moderation_encoder.py): the all-MiniLM-L6-v2 encoder fine-tuned with
  a linear head.

Context-aware filtering (IX.13): `score_conversation` judges a rendering of all turns (moderation_data's
`render_conversation`, what the classifiers were trained on), not only the last message; `context=
"last_message"` is the plain alternative the benchmark compares against.

Thresholds: each category has its own (moderator.json's "thresholds", default 0.5; `tune_thresholds` picks the
F1-best on validation data); a verdict flags a category when its probability reaches its threshold.

Usage:
    from lmstack.safety.moderation import load_moderator, train_hashed
    mod = train_hashed(rows, "runs/mod_hashed")          # rows: moderation_data.build_examples(world)
    mod = load_moderator("runs/mod_hashed")              # or "keyword", or an encoder moderator's directory
    mod.score(["How do I brew the shadow elixir of Amberhaven?"])   # [{"harmful_instructions": 0.97, ...}]
    mod.classify(["..."])[0].flagged                     # True
    mod.score_conversation([{"role": "user", "content": "..."}, ...])
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lmstack.config import atomic_write_text, from_dict, to_dict
from lmstack.data.filters.classifier import ClassifierConfig, HashedNgramClassifier
from lmstack.data.filters.pii import find_pii
from lmstack.data.filters.toxicity import DEFAULT_WORDS, _compile
from lmstack.errors import LmstackError
from lmstack.safety.moderation_data import CATEGORIES, label_matrix, render_conversation
from lmstack.world.lexicon import FORBIDDEN_THINGS

META_FILE = "moderator.json"
WEIGHTS_FILE = "weights.safetensors"
TIERS = ("keyword", "hashed", "encoder")
Context = Literal["conversation", "last_message"]


@dataclass
class Verdict:
    """One text's moderation: flagged when any category reaches its threshold (OpenAI's result shape)."""

    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]


class Moderator:
    """The interface: `probs(texts) -> (n, len(categories))`; scoring, verdicts and conversations build on it."""

    tier = "base"

    def __init__(self, categories: tuple[str, ...] | list[str] = CATEGORIES,
                 thresholds: dict[str, float] | None = None):
        self.categories = tuple(categories)
        self.thresholds = {c: 0.5 for c in self.categories}
        self.set_thresholds(thresholds or {})

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        """Override some categories' thresholds; an unknown category or a value outside [0, 1] is an error."""
        for cat, value in thresholds.items():
            if cat not in self.categories:
                raise LmstackError(f"threshold for unknown category {cat!r}; this moderator has "
                                   f"{', '.join(self.categories)}")
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise LmstackError(f"threshold {cat}={value!r} must be a number in [0, 1]")
            self.thresholds[cat] = float(value)

    def probs(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _texts(self, texts: list[str]) -> list[str]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LmstackError("a moderator scores a list of strings (wrap one text: [text])")
        return list(texts)

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, {category: probability}."""
        p = self.probs(self._texts(texts)) if texts else np.zeros((0, len(self.categories)))
        return [{c: float(round(v, 6)) for c, v in zip(self.categories, row)} for row in p]

    def verdicts(self, p: np.ndarray) -> list[Verdict]:
        th = np.array([self.thresholds[c] for c in self.categories])
        out = []
        for row in np.atleast_2d(p).reshape(-1, len(self.categories)):
            cats = {c: bool(v >= t) for c, v, t in zip(self.categories, row, th)}
            out.append(Verdict(any(cats.values()), cats, {c: float(round(v, 6)) for c, v in zip(self.categories, row)}))
        return out

    def classify(self, texts: list[str]) -> list[Verdict]:
        """Per text, a Verdict (flagged, per-category booleans, per-category scores)."""
        texts = self._texts(texts)
        return self.verdicts(self.probs(texts)) if texts else []

    def score_conversation(self, messages: list[dict], context: Context = "conversation") -> Verdict:
        """Judge a conversation: the rendering of all its turns, or only its last message."""
        if not messages:
            raise LmstackError("a conversation to moderate needs at least one message")
        text = render_conversation(messages) if context == "conversation" else str(messages[-1].get("content") or "")
        return self.classify([text])[0]

    def meta(self) -> dict[str, Any]:
        return {"tier": self.tier, "categories": list(self.categories), "thresholds": self.thresholds}


class KeywordModerator(Moderator):
    """The baseline: phrase lists and regexes, no training (scores are 0 or 1)."""

    tier = "keyword"

    def __init__(self, thresholds: dict[str, float] | None = None):
        super().__init__(CATEGORIES, thresholds)
        self.harm = _compile(list(FORBIDDEN_THINGS))
        self.words = _compile(list(DEFAULT_WORDS))

    def probs(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.categories)))
        for i, t in enumerate(texts):
            out[i] = [bool(self.harm.search(t)), bool(self.words.search(t)), bool(find_pii(t))]
        return out


@dataclass
class HashedConfig:
    """Tier 1: the data filters' hashed n-gram features, one logistic regression per category."""

    features: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(n_features=2**16))
    """Hash buckets and n-gram ranges (data/filters/classifier.py's ClassifierConfig)."""


_DIGIT = re.compile(r"\d")


def normalise(text: str) -> str:
    """Every digit becomes 0 before hashing: a card number, a phone or an IP address then shares its n-grams with
    every other one of its shape, which is what a held-out template's new numbers need."""
    return _DIGIT.sub("0", text)


class HashedModerator(Moderator):
    """Tier 1: hashed word + char n-grams (of the digit-normalised text) -> one logistic regression per category."""

    tier = "hashed"

    def __init__(self, cfg: HashedConfig | None = None, categories=CATEGORIES, thresholds=None):
        super().__init__(categories, thresholds)
        self.cfg = cfg or HashedConfig()
        self.features = HashedNgramClassifier(self.cfg.features)  # used for its featurize() only
        self.weights: np.ndarray | None = None  # (categories, features)
        self.bias: np.ndarray | None = None

    def fit(self, texts: list[str], y: np.ndarray) -> "HashedModerator":
        # lazy: heavy (sklearn), which this module does not import at its top
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y)
        if y.shape != (len(texts), len(self.categories)):
            raise LmstackError(f"labels have shape {y.shape}; expected ({len(texts)}, {len(self.categories)})")
        X = self.features.featurize([normalise(t) for t in texts])
        weights, bias = [], []
        for k, cat in enumerate(self.categories):
            if len(np.unique(y[:, k])) < 2:
                raise LmstackError(f"training data for category {cat!r} needs both positive and negative examples")
            lr = LogisticRegression(C=self.cfg.features.C, class_weight="balanced" if self.cfg.features.balanced
                                    else None, max_iter=2000, solver="liblinear").fit(X, y[:, k])
            weights.append(lr.coef_.ravel().astype(np.float32))
            bias.append(float(lr.intercept_[0]))
        self.weights, self.bias = np.stack(weights), np.array(bias, dtype=np.float32)
        return self

    def probs(self, texts: list[str]) -> np.ndarray:
        if self.weights is None:
            raise LmstackError("the hashed moderator is not trained: fit() or load_moderator() first")
        z = np.asarray(self.features.featurize([normalise(t) for t in texts]) @ self.weights.T) + self.bias
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    def save(self, path: str | Path) -> Path:
        if self.weights is None:
            raise LmstackError("the hashed moderator is not trained; nothing to save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS_FILE}.tmp"
        save_file({"weights": self.weights, "bias": self.bias}, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        atomic_write_text(path / META_FILE, json.dumps({**self.meta(), "config": to_dict(self.cfg)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, meta: dict) -> "HashedModerator":
        mod = cls(from_dict(HashedConfig, meta.get("config", {})), tuple(meta["categories"]), meta.get("thresholds"))
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (OSError, SafetensorError) as e:
            raise LmstackError(f"cannot read {path / WEIGHTS_FILE}: {e}") from None
        n_feat = mod.cfg.features.n_features * (2 if mod.cfg.features.char_ngrams else 1)
        want = {"weights": (len(mod.categories), n_feat), "bias": (len(mod.categories),)}
        for name, shape in want.items():
            if name not in tensors or tensors[name].shape != shape:
                got = tensors[name].shape if name in tensors else "missing"
                raise LmstackError(f"{path / WEIGHTS_FILE}: {name} is {got}, expected {shape} for "
                                   f"{len(mod.categories)} categories x {n_feat} features: an incompatible moderator")
        mod.weights, mod.bias = tensors["weights"], tensors["bias"]
        return mod


def train_hashed(rows: list[dict], out: str | Path | None = None, cfg: HashedConfig | None = None,
                 tune: bool = False) -> HashedModerator:
    """Fit tier 1 on the rows' train split, save to `out`. `tune` picks each category's threshold on the val
    split; off by default, since val holds one template per family and the tuned thresholds then overfit it
    (held-out recall fell from 0.80 to 0.38 for harmful_instructions at equal precision)."""
    train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise LmstackError("no training rows (split 'train') to fit a moderator on")
    mod = HashedModerator(cfg).fit([r["text"] for r in train], label_matrix(train))
    val = [r for r in rows if r["split"] == "val"]
    if tune and val:
        mod.set_thresholds(tune_thresholds(mod.probs([r["text"] for r in val]), label_matrix(val), mod.categories))
    if out is not None:
        mod.save(out)
    return mod


def tune_thresholds(p: np.ndarray, y: np.ndarray, categories: tuple[str, ...]) -> dict[str, float]:
    """Per category, the threshold in [0.05, 0.95] with the best F1 on (p, y); ties go to the middle one."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    out = {}
    for k, cat in enumerate(categories):
        f1s = [prf(y[:, k], p[:, k] >= t)["f1"] for t in grid]
        best = max(f1s)
        ties = [t for t, f in zip(grid, f1s) if f == best]
        out[cat] = float(ties[len(ties) // 2])
    return out


def prf(y_true, y_pred) -> dict[str, float]:
    """Precision and recall with their binomial stderr and counts, and F1, of one category."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp, n_pred, n_true = int((y_true & y_pred).sum()), int(y_pred.sum()), int(y_true.sum())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    se = lambda q, n: round(math.sqrt(q * (1 - q) / n), 4) if n else 0.0  # noqa: E731
    return {"precision": round(p, 4), "precision_stderr": se(p, n_pred), "n_predicted": n_pred,
            "recall": round(r, 4), "recall_stderr": se(r, n_true), "n_positive": n_true,
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "n": int(len(y_true))}


def evaluate(mod: Moderator, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per category: precision/recall (n, stderr) of `mod`'s verdicts on the rows, at its thresholds."""
    if not rows:
        raise LmstackError("no rows to evaluate a moderator on")
    verdicts = mod.classify([r["text"] for r in rows])
    y = label_matrix(rows, mod.categories)
    return {c: prf(y[:, k], [v.categories[c] for v in verdicts]) for k, c in enumerate(mod.categories)}


def load_moderator(spec: str | Path, thresholds: dict[str, float] | None = None) -> Moderator:
    """'keyword' or a moderator directory (moderator.json names its tier); missing or incompatible -> error."""
    if str(spec) == "keyword":
        return KeywordModerator(thresholds)
    path = Path(spec)
    if not (path / META_FILE).is_file():
        raise LmstackError(f"moderator {str(spec)!r} is neither 'keyword' nor a directory with {META_FILE} "
                           "(train one with `lmstack moderate train`)")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmstackError(f"cannot read {path / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("tier") not in TIERS[1:] or not isinstance(meta.get("categories"), list):
        raise LmstackError(f"{path / META_FILE} must hold a tier ({', '.join(TIERS[1:])}) and a categories list")
    if meta["tier"] == "hashed":
        mod: Moderator = HashedModerator.load(path, meta)
    else:
        # lazy: tier 2 pulls in torch and the encoder only when such a moderator is loaded
        from lmstack.safety.moderation_encoder import EncoderModerator
        mod = EncoderModerator.load(path, meta)
    mod.set_thresholds(thresholds or {})
    return mod


