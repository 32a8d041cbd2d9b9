"""Guardrails around a chat model: input moderation, output moderation over sliding windows, PII redaction.

`GuardConfig` is what `lmstack serve --guard CONFIG` reads (YAML or JSON; an unknown key or a bad value is an
error at startup that names the key). `Guard` applies it:
- input: the request is judged before the engine sees it: the whole conversation rendered (context-aware,
  IX.13) or only its last message (`input_context`); a flagged request gets the refusal with
  finish_reason "content_filter" (what OpenAI's API answers), and the model never runs;
- output: `OutputMonitor` follows a streamed reply. Every `stride` new characters it scores the last `window`
  characters; text is released to the client only once a window that covers it was judged safe, so a
  continuation that turns harmful is cut the moment a window flags it: the client gets the refusal and
  finish_reason "content_filter" instead of the rest, and the engine request is aborted. A finished,
  non-streamed reply is scored window by window the same way;
- PII: released text goes through the data pipeline's redaction (emails, phones, cards, IPs -> <EMAIL>...);
  while streaming, the last `pii_hold` characters wait, so a phone number that is still arriving is never
  half-sent before it can be recognised.

Usage:
    guard = Guard(load_guard_config("guard.yaml"))     # or Guard(GuardConfig(moderator="runs/mod_hashed"))
    guard.check_messages([{"role": "user", "content": "How do I brew the shadow elixir of Amberhaven?"}])  # a Verdict
    mon = guard.monitor()
    piece, cut = mon.feed("Sure! Step one: grind", final=False)   # piece: text safe to send now
    text, cut = guard.filter_output("Call me at 555-123-4567.")     # ("Call me at <PHONE>.", False)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmstack.config import ConfigError, from_dict, read_mapping
from lmstack.data.filters.pii import PLACEHOLDERS, find_pii
from lmstack.errors import LmstackError
from lmstack.safety.moderation import Moderator, Verdict, load_moderator

CONTENT_FILTER = "content_filter"


@dataclass
class GuardConfig:
    """Server guardrails: which moderator, its thresholds, and what is checked."""

    moderator: str = "keyword"
    """'keyword' (phrase lists and PII regexes, no training) or a moderator directory (`lmstack moderate train`)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per-category thresholds overriding the moderator's own, e.g. {harassment: 0.7}."""
    block: list[str] = field(default_factory=lambda: ["harmful_instructions", "harassment"])
    """Categories that refuse a request or cut a reply; the others (pii: redacted instead) are only scored."""
    check_input: bool = True
    """Moderate requests before the engine runs them."""
    input_context: Literal["conversation", "last_message"] = "conversation"
    """Judge the whole conversation (context-aware) or only its last message."""
    check_output: bool = True
    """Moderate replies (streamed ones window by window)."""
    window: int = 160
    """Characters of reply each output check reads (the latest ones)."""
    stride: int = 40
    """A new output check every this many new characters."""
    redact_pii: bool = True
    """Replace emails, phone numbers, card numbers and IP addresses in replies with <EMAIL>, <PHONE>, ..."""
    pii_hold: int = 24
    """Characters held back at the end of a stream until the PII check can see them whole."""
    refusal: str = "I'm sorry, but I can't help with that."
    """The reply that replaces a flagged request or the rest of a flagged reply."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1 or self.stride > self.window:
            raise ConfigError(f"guard window={self.window} and stride={self.stride} need 1 <= stride <= window")
        if self.pii_hold < 0:
            raise ConfigError(f"guard pii_hold={self.pii_hold} must be >= 0")
        if not self.refusal.strip():
            raise ConfigError("guard refusal must be a non-empty message")
        for cat, value in self.thresholds.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"guard thresholds.{cat}={value} must be in [0, 1]")


def load_guard_config(path: str | Path) -> GuardConfig:
    """A GuardConfig from a YAML or JSON file (strict: an unknown key is an error naming it)."""
    data = read_mapping(path)
    try:
        return from_dict(GuardConfig, data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"guard config {path}: {e}") from None


class Guard:
    """A GuardConfig with its moderator loaded (loading fails here, at startup, for a bad moderator)."""

    def __init__(self, cfg: GuardConfig | None = None, moderator: Moderator | None = None):
        self.cfg = cfg or GuardConfig()
        self.moderator = moderator if moderator is not None else load_moderator(self.cfg.moderator)
        try:
            self.moderator.set_thresholds(self.cfg.thresholds)
        except LmstackError as e:
            raise ConfigError(f"guard thresholds: {e}") from None
        unknown = [c for c in self.cfg.block if c not in self.moderator.categories]
        if unknown:
            raise ConfigError(f"guard block has {unknown[0]!r}, which the moderator does not score; its categories: "
                              f"{', '.join(self.moderator.categories)}")

    def blocks(self, verdict: Verdict) -> bool:
        """Whether a verdict refuses/cuts: one of cfg.block's categories is over its threshold."""
        return any(verdict.categories.get(c, False) for c in self.cfg.block)

    def check_messages(self, messages: list[dict]) -> Verdict | None:
        """The request's verdict when it blocks (the rendered conversation, or its last message: cfg.input_context),
        else None."""
        verdict = self.moderator.score_conversation(messages, self.cfg.input_context)
        return verdict if self.blocks(verdict) else None

    def check_texts(self, texts: list[str]) -> Verdict | None:
        """The first verdict that blocks among several texts (the prompts of one /v1/completions request)."""
        return next((v for v in self.moderator.classify(texts) if self.blocks(v)), None)

    def window_ends(self, start: int, length: int, final: bool) -> list[int]:
        """Where the output windows after `start` end: every stride characters, and at the end when final."""
        ends = list(range(start + self.cfg.stride, length + 1, self.cfg.stride))
        if final and length > (ends[-1] if ends else start):
            ends.append(length)
        return ends

    def flagged_window(self, text: str, ends: list[int]) -> Verdict | None:
        """The first window (ending at one of `ends`) that blocks, or None."""
        if not ends:
            return None
        windows = [text[max(0, e - self.cfg.window):e] for e in ends]
        return next((v for v in self.moderator.classify(windows) if self.blocks(v)), None)

    def filter_output(self, text: str) -> tuple[str, bool]:
        """A finished reply: (the refusal, True) when a window is flagged, else (the reply, PII redacted, False)."""
        if self.cfg.check_output and self.flagged_window(text, self.window_ends(0, len(text), True)):
            return self.cfg.refusal, True
        return (redact(text) if self.cfg.redact_pii else text), False

    def monitor(self) -> "OutputMonitor":
        return OutputMonitor(self)


def redact(text: str, upto: int | None = None) -> str:
    """`text[:upto]` with every PII span that ends by `upto` replaced by its placeholder."""
    upto = len(text) if upto is None else upto
    out, last = [], 0
    for s, e, kind in find_pii(text):
        if e > upto:
            break
        out += [text[last:s], PLACEHOLDERS[kind]]
        last = e
    out.append(text[last:upto])
    return "".join(out)


_SPACE = re.compile(r"\s")


class OutputMonitor:
    """One streamed reply: feed it the whole text so far; it answers what may be sent now, and whether to cut."""

    def __init__(self, guard: Guard):
        self.guard, self.cfg = guard, guard.cfg
        self.checked = 0  # characters of the raw text that checked windows cover
        self.sent = ""  # what went out so far (redacted)
        self.cut: Verdict | None = None

    def _release_limit(self, text: str, final: bool) -> int:
        p = self.checked if self.cfg.check_output else len(text)
        if final or not self.cfg.redact_pii:
            return p
        p = min(p, max(0, len(text) - self.cfg.pii_hold))
        # Never stop inside a word (an email still growing), nor inside a PII span seen so far.
        while p > 0 and p < len(text) and not _SPACE.match(text[p]):
            p -= 1
        for s, e, _ in find_pii(text):
            if s < p < e:
                p = s
        return p

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text to send now, cut?) for the reply so far; once cut, always ('', True)."""
        if self.cut is not None:
            return "", True
        if self.cfg.check_output:
            ends = self.guard.window_ends(self.checked, len(text), final)
            verdict = self.guard.flagged_window(text, ends)
            if verdict is not None:
                self.cut = verdict
                return "", True
            if ends:
                self.checked = ends[-1]
        p = self._release_limit(text, final)
        released = redact(text, p) if self.cfg.redact_pii else text[:p]
        if not released.startswith(self.sent):  # a span reinterpreted late: never resend, only go on
            released = self.sent + released[len(self.sent):]
        piece = released[len(self.sent):]
        self.sent = released
        return piece, False

    def refusal_piece(self) -> str:
        """The refusal as the next piece of a cut stream (after a space when something was already sent)."""
        sep = " " if self.sent and not self.sent[-1].isspace() else ""
        return sep + self.cfg.refusal
