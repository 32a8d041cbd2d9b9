"""Document filters: a registry of name -> (config class, filter class), run in registry order.

Each filter is built from its config and called on a batch: `filter(batch) -> StepResult`.
`FiltersConfig` has one field per registered filter, each with its own `enabled` switch, so a
YAML recipe reads:
    filters:
      quality: {level: char, min_chars: 100}
      langid: {languages: [en, fr]}
      pii: {action: redact}

Usage:
    from lmstack.data.filters import FiltersConfig, build_filters
    for name, step in build_filters(FiltersConfig()):
        result = step(batch)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lmstack.data.filters.classifier import ClassifierFilter, ClassifierFilterConfig
from lmstack.data.filters.langid import LangIdConfig, LangIdFilter
from lmstack.data.filters.pii import PiiConfig, PiiFilter
from lmstack.data.filters.quality import QualityConfig, QualityFilter
from lmstack.data.filters.readability import ReadabilityConfig, ReadabilityFilter
from lmstack.data.filters.toxicity import ToxicityConfig, ToxicityFilter

# Order is the order filters run in: cheap rules first, so slow ones (langdetect, the classifier)
# see fewer documents; PII redaction runs last on what survives.
FILTERS: dict[str, Callable[[Any], Callable]] = {
    "quality": QualityFilter,
    "toxicity": ToxicityFilter,
    "langid": LangIdFilter,
    "readability": ReadabilityFilter,
    "classifier": ClassifierFilter,
    "pii": PiiFilter,
}


@dataclass
class FiltersConfig:
    """One config per filter; each has `enabled`."""

    quality: QualityConfig = field(default_factory=QualityConfig)
    """Gopher/C4 heuristics (word or char level)."""
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    """Word lists, blocked phrases, optional toxicity classifier."""
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    """Language identification (langdetect)."""
    readability: ReadabilityConfig = field(default_factory=ReadabilityConfig)
    """Flesch-Kincaid grade range (textstat); off by default."""
    classifier: ClassifierFilterConfig = field(default_factory=ClassifierFilterConfig)
    """Trained hashed n-gram quality classifier; off until a model is given."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """PII detection: redact, drop or flag."""


def build_filters(cfg: FiltersConfig) -> list[tuple[str, Callable]]:
    """The enabled filters, in registry order, as (name, callable) pairs."""
    return [(name, make(getattr(cfg, name))) for name, make in FILTERS.items() if getattr(cfg, name).enabled]
