"""EngineContext: the facts about the served model that the engine's collaborators read.

The output processor, the request builder, the sampler and the speculative decoder each need a few of
these (the tokenizer, the EOS set, the vocabulary they may emit, the context length, the counters, the
grammar compiler); they get this object instead of a reference back to the engine.

Usage:
    ctx = EngineContext(tokenizer, eos_ids=frozenset({2}), vocab=512, max_model_len=256)
    ctx.count("generation_tokens")
    ctx.guided_decoder().new_matcher(params)     # built on first use, once, thread-safe
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from lmstack.infer.constrained import GuidedDecoder

COUNTERS = ("prompt_tokens", "prefill_tokens", "generation_tokens", "steps", "requests_finished",
            "requests_aborted", "requests_failed")


@dataclass
class EngineContext:
    tokenizer: Any
    eos_ids: frozenset[int]
    """The model's eos ids plus the tokenizer's stop set (its EOS, generation_config's list, end of turn)."""
    vocab: int
    """Ids the sampler may emit: the model's real rows, cut to the tokenizer's ids (model/vocab.py)."""
    max_model_len: int
    banned_phrases: tuple[str, ...] = ()
    """The engine's hard phrase bans: every request gets them, none can lift them (lmstack.safety.phrase_ban)."""
    extra_ids: Any = None
    """check(ids) -> bool for prompt ids outside [0, vocab): a VLM adapter's image placeholders (ids past the
    vocabulary that stand for a stored picture: multimodal/engine_adapter.py); None: such ids are refused."""
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    _guided: GuidedDecoder | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def guided_decoder(self) -> GuidedDecoder:
        if self._guided is None:
            with self._lock:  # requests may be prepared in several worker threads at once (async_engine.py)
                if self._guided is None:
                    self._guided = GuidedDecoder(self.tokenizer, self.eos_ids, self.vocab)
        return self._guided
