"""Mixing and sampling: target source proportions, temperature sampling across languages, topic
balance, and an adaptive (DoReMi-lite) reweighting hook for the trainer.

Offline mixing (used by the pipeline): every document gets a weight, the product of one factor
per active rule, factor = target share / natural share of its group:
- source:   `weights` gives target shares per source;
- language: temperature sampling, target p_lang proportional to n_lang^(1/T) (T=1 natural,
  larger T flattens towards uniform, which upsamples low-resource languages);
- topic:    target p_topic proportional to n_topic^(1 - strength) (see topics.py).
A document's expected number of copies is total * weight / sum(weights), capped at `max_repeat`,
and realised by seeded stochastic rounding (floor, plus one more with probability = fraction).
So a source can be downsampled (some documents get 0 copies) or upsampled (repeated).

Online reweighting (for training): `AdaptiveWeights.update(per_source_loss, reference_loss)`
moves weight towards sources whose loss exceeds a reference model's (DoReMi, Xie et al. 2023):
w <- normalise(w * exp(lr * max(loss - ref, 0))), then w <- (1 - c) w + c / k (smoothing towards
uniform, inside the recursion as in DoReMi, so no domain's weight ever falls below c / k).
`DoReMi` is the trainer hook that does this during pretraining (`data.adaptive` in the run config):
every `update_every` steps it draws `probe_rows` rows of each domain, takes the per-token losses of the
model being trained and of a frozen reference model, averages max(l_model - l_ref, 0) per domain, and
updates the weights that lmstack.data.loader.DomainMixLoader samples the next rows' domains from.

Usage:
    from lmstack.data.mixing import MixConfig, mixture_copies, temperature_shares, AdaptiveWeights
    temperature_shares({"en": 900, "fr": 100}, T=2.0)       # {'en': 0.75, 'fr': 0.25}
    copies = mixture_copies({"source": srcs, "lang": langs}, MixConfig(weights={"a": .5, "b": .5}))
    aw = AdaptiveWeights(["web", "code"]); aw.update({"web": 3.1, "code": 2.0}, {"web": 2.9, "code": 2.0})
    # in a run config (lmstack pretrain):  data.adaptive: {enabled: true, domains: {web: DIR, code: DIR},
    #                                                      reference: REF_MODEL_DIR, update_every: 10}
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
import math
from typing import Any, Sequence

import numpy as np

from lmstack.data.topics import TopicConfig, balanced_shares
from lmstack.errors import LmstackError


@dataclass
class MixConfig:
    """How the kept documents are mixed into the final corpus."""

    enabled: bool = True
    """Apply the mixing rules below (off: every kept document once)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Target share per source name (normalised); empty keeps natural proportions. Must name every source."""
    language_temperature: float = 1.0
    """Temperature T across languages: p ~ n^(1/T); 1 = natural, >1 upsamples rare languages."""
    total_docs: int = 0
    """Documents in the mixed corpus (copies included); 0 = as many as were kept."""
    max_repeat: float = 4.0
    """No document is expected to appear more than this many times."""
    seed: int = 0
    """Seed of the stochastic rounding."""
    topics: TopicConfig = field(default_factory=TopicConfig)
    """Topic clustering and balancing (off by default)."""

    def __post_init__(self) -> None:
        if self.language_temperature <= 0:
            raise ValueError(f"mix.language_temperature={self.language_temperature} must be > 0")
        if self.max_repeat < 1:
            raise ValueError(f"mix.max_repeat={self.max_repeat} must be >= 1")
        if self.total_docs < 0:
            raise ValueError(f"mix.total_docs={self.total_docs} must be >= 0")
        bad = {k: v for k, v in self.weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ValueError(f"mix.weights must be non-negative numbers; got {bad}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("mix.weights must not all be zero")


def temperature_shares(counts: dict[str, int], T: float) -> dict[str, float]:
    """Sampling share per group with p proportional to n^(1/T)."""
    if T <= 0:
        raise ValueError(f"temperature T={T} must be > 0")
    powered = {k: n ** (1.0 / T) if n > 0 else 0.0 for k, n in counts.items()}
    total = sum(powered.values())
    return {k: v / total for k, v in powered.items()} if total else {k: 0.0 for k in counts}


def _factors(keys: Sequence[Any], target: dict) -> np.ndarray:
    """Per-document factor target share / natural share of its group."""
    counts = Counter(keys)
    n = len(keys)
    factor = {k: (target.get(k, 0.0) / (c / n)) if c else 0.0 for k, c in counts.items()}
    return np.array([factor[k] for k in keys], dtype=np.float64)


def mixture_weights(groups: dict[str, Sequence[Any]], cfg: MixConfig) -> np.ndarray:
    """Relative weight of each document under the active rules.

    `groups` maps a rule to each document's group: "source" (names), "lang" (codes), "topic" (ints).
    """
    n = len(next(iter(groups.values()))) if groups else 0
    w = np.ones(n, dtype=np.float64)
    if cfg.weights and "source" in groups:
        missing = sorted(set(groups["source"]) - set(cfg.weights))
        if missing:
            raise LmstackError(f"mix.weights has no weight for source(s) {missing}; named: {sorted(cfg.weights)}")
        total = sum(cfg.weights.values())
        w *= _factors(groups["source"], {k: v / total for k, v in cfg.weights.items()})
    if cfg.language_temperature != 1.0 and "lang" in groups:
        w *= _factors(groups["lang"], temperature_shares(Counter(groups["lang"]), cfg.language_temperature))
    if cfg.topics.enabled and cfg.topics.strength > 0 and "topic" in groups:
        w *= _factors(groups["topic"], balanced_shares(Counter(groups["topic"]), cfg.topics.strength))
    return w


def mixture_copies(groups: dict[str, Sequence[Any]], cfg: MixConfig) -> np.ndarray:
    """How many times each document appears in the mixed corpus (0 = sampled out)."""
    w = mixture_weights(groups, cfg)
    if len(w) == 0 or w.sum() == 0:
        return np.zeros(len(w), dtype=np.int64)
    total = cfg.total_docs or len(w)
    expected = np.minimum(total * w / w.sum(), cfg.max_repeat)
    rng = np.random.default_rng(cfg.seed)
    base = np.floor(expected)
    return (base + (rng.random(len(w)) < expected - base)).astype(np.int64)


def achieved_shares(keys: Sequence[Any], copies: np.ndarray) -> dict[str, float]:
    """Share of each group in the mixed corpus (for the report: target vs achieved)."""
    totals: Counter = Counter()
    for k, c in zip(keys, copies.tolist()):
        totals[str(k)] += c
    n = sum(totals.values())
    return {k: round(v / n, 4) if n else 0.0 for k, v in sorted(totals.items())}


class AdaptiveWeights:
    """DoReMi-lite: exponentiated-gradient updates of source weights towards higher excess loss."""

    def __init__(self, sources: Sequence[str], init: dict[str, float] | None = None, lr: float = 1.0,
                 smoothing: float = 1e-3) -> None:
        if not sources:
            raise LmstackError("AdaptiveWeights needs at least one source")
        if lr <= 0 or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"lr={lr} must be > 0 and smoothing={smoothing} in [0, 1)")
        self.sources = list(sources)
        self.lr, self.smoothing = lr, smoothing
        w = np.array([(init or {}).get(s, 1.0) for s in self.sources], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("initial weights must be non-negative and not all zero")
        self.log_w = np.log(np.maximum(w / w.sum(), 1e-30))

    @property
    def weights(self) -> dict[str, float]:
        p = np.exp(self.log_w - self.log_w.max())
        p /= p.sum()
        return {s: float(v) for s, v in zip(self.sources, p)}

    def update(self, per_source_loss: dict[str, float], reference_loss: dict[str, float]) -> dict[str, float]:
        """One step: excess = max(loss - reference, 0) per source; return the new weights."""
        missing = [s for s in self.sources if s not in per_source_loss or s not in reference_loss]
        if missing:
            raise LmstackError(f"AdaptiveWeights.update: no loss for source(s) {missing}")
        excess = np.array([max(per_source_loss[s] - reference_loss[s], 0.0) for s in self.sources])
        if not np.isfinite(excess).all():
            raise LmstackError(f"AdaptiveWeights.update: non-finite losses {per_source_loss}")
        p = np.exp(self.log_w + self.lr * excess - (self.log_w + self.lr * excess).max())
        p = (1 - self.smoothing) * p / p.sum() + self.smoothing / len(p)
        self.log_w = np.log(p)
        return self.weights

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """Draw n source names from the current weights (which source the next batch comes from)."""
        w = self.weights
        return list(rng.choice(self.sources, size=n, p=[w[s] for s in self.sources]))

    def state_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "log_w": self.log_w.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sources") != self.sources:
            raise LmstackError(f"AdaptiveWeights state is for sources {state.get('sources')}, not {self.sources}")
        self.log_w = np.array(state["log_w"], dtype=np.float64)


def entropy(shares: dict[str, float]) -> float:
    """Shannon entropy (nats) of a share table; higher = more balanced."""
    return float(-sum(p * math.log(p) for p in shares.values() if p > 0))


@dataclass
class AdaptiveConfig:
    """DoReMi-style online domain weights during pretraining (`data.adaptive` of the run config)."""

    enabled: bool = False
    """Sample each training row's domain from weights that follow the excess loss over a reference model."""
    domains: dict[str, str] = field(default_factory=dict)
    """Domain name -> training shard directory (one `lmstack data run` output per domain); replaces data.shards."""
    reference: str = ""
    """Reference model directory (lmstack.load_model), e.g. the same model trained on a uniform mix."""
    init: dict[str, float] = field(default_factory=dict)
    """Starting weights per domain (normalised); empty = uniform. Also the fixed mix when enabled=false but
    domains are given."""
    update_every: int = 10
    """Optimizer steps between weight updates."""
    step_size: float = 1.0
    """Exponentiated-gradient step size (eta): w <- w * exp(eta * excess loss)."""
    smoothing: float = 1e-3
    """Mix the new weights with uniform by this fraction after every update (c in DoReMi)."""
    probe_rows: int = 4
    """Rows drawn per domain to measure the losses at each update."""

    def __post_init__(self) -> None:
        if self.update_every < 1 or self.probe_rows < 1:
            raise ValueError(f"data.adaptive.update_every={self.update_every} and probe_rows={self.probe_rows} "
                             "must be >= 1")
        if not self.step_size > 0 or not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"data.adaptive.step_size={self.step_size} must be > 0 and smoothing={self.smoothing} "
                             "in [0, 1)")
        unknown = sorted(set(self.init) - set(self.domains))
        if unknown:
            raise ValueError(f"data.adaptive.init names domain(s) {unknown} that are not in data.adaptive.domains "
                             f"({sorted(self.domains)})")
        if self.enabled and (len(self.domains) < 2 or not self.reference):
            raise ValueError("data.adaptive.enabled needs at least two data.adaptive.domains and a "
                             "data.adaptive.reference model directory")


class DoReMi:
    """Trainer hook: every `update_every` steps, measure per-domain excess loss on probe rows and update the
    weights that the DomainMixLoader samples from.

    excess(domain) = mean over the probe tokens of max(l_model(token) - l_reference(token), 0)."""

    def __init__(self, cfg: AdaptiveConfig, weights: AdaptiveWeights, probes: dict[str, Any], reference: Any):
        """probes: domain -> iterator of (x, y) LongTensor batches; reference: a frozen model."""
        self.cfg, self.weights, self.probes, self.reference = cfg, weights, probes, reference
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.history: list[dict[str, float]] = []

    def excess(self, model: Any, device: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """(excess, model loss, reference loss) per domain on one fresh probe batch each."""
        # lazy: heavy (torch), which this module does not import at its top
        import torch
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        ex, lm, lr = {}, {}, {}
        with torch.no_grad():
            for name, it in self.probes.items():
                batch = next(it)
                x, y = batch[0].to(device), batch[1].to(device)
                a = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
                b = F.cross_entropy(self.reference(x).float().flatten(0, 1), y.flatten(), reduction="none")
                ex[name] = float((a - b).clamp_min(0).mean())
                lm[name], lr[name] = float(a.mean()), float(b.mean())
        model.train(was_training)
        return ex, lm, lr

    def after_step(self, trainer: Any) -> dict[str, float]:
        """Called by the Trainer after each optimizer step; returns metrics to log (the current weights)."""
        if trainer.step % self.cfg.update_every:  # the current weights, so every logged row shows them
            return {f"domain_weight_{k}": v for k, v in self.weights.weights.items()}
        ex, _, _ = self.excess(trainer.raw, trainer.device)
        # AdaptiveWeights.update takes (loss, reference); passing (excess, 0) applies the per-token clipping above
        w = self.weights.update(ex, {k: 0.0 for k in ex})
        self.history.append({"step": trainer.step, **{f"w_{k}": v for k, v in w.items()},
                             **{f"excess_{k}": v for k, v in ex.items()}})
        return {f"domain_weight_{k}": v for k, v in w.items()} | {f"excess_loss_{k}": v for k, v in ex.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict(), "probes": {k: it.state_dict() for k, it in self.probes.items()},
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        for k, it in self.probes.items():
            it.load_state_dict(state["probes"][k])
        self.history = list(state.get("history", []))
