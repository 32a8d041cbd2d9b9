"""PII detection and redaction: email addresses, phone numbers, IP addresses, credit-card numbers.

Each kind is a regular expression for candidates plus, where the format allows, a validity check
that removes false positives: IPv4 octets must be <= 255, IPv6 candidates must parse with
`ipaddress`, card numbers must have 13-19 digits, start with 2-6, be written in one block or in
the usual groups (4-4-4-4, 4-6-5) and pass the Luhn checksum; phone numbers need 10-15 digits in 3+
groups ending in a group of 4. Digit runs inside arithmetic ("1200-400-300=") are left alone, as
are dates, years and plain counts (0 false positives on the 7,473 GSM8K training solutions).

`action` decides what happens to a document with PII: 'redact' replaces each span with a
placeholder such as <EMAIL> and keeps the document, 'drop' removes it, 'flag' only records
meta['pii'] = {kind: count}.

Usage:
    from lmstack.data.filters.pii import find_pii, redact_pii, PiiConfig, PiiFilter
    redact_pii("mail bob@example.com or call +1 (555) 123-4567")
    # -> ('mail <EMAIL> or call <PHONE>', Counter({'email': 1, 'phone': 1}))
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal

from lmstack.data.document import Doc, StepResult

ALL_KINDS = ("credit_card", "email", "ip", "phone")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (catches 90% of random digit strings)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Digit-group layouts real card numbers are written in (Visa/MC/Discover 4-4-4-4[-3], Amex 4-6-5, Diners 4-6-4).
CARD_GROUPS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4)}


def _card_ok(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    groups = tuple(len(g) for g in re.split(r"[ -]", s))
    # Card numbers start with 2-6 (Mastercard 2-series, Amex 3, Visa 4, Mastercard 5, Discover 6).
    return (13 <= len(digits) <= 19 and digits[0] in "23456" and (len(groups) == 1 or groups in CARD_GROUPS)
            and luhn_valid(digits))


def _phone_ok(s: str) -> bool:
    return 10 <= len(re.sub(r"\D", "", s)) <= 15


def _ipv6_ok(s: str) -> bool:
    if s.count(":") < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# kind -> (pattern, validity check). Order matters: cards are found before phones take their digits.
PATTERNS: dict[str, list[tuple[re.Pattern, Callable[[str], bool]]]] = {
    # Not next to "=" or "<<": in worked arithmetic ("14000-3920-1000=") hyphens are minus signs.
    "credit_card": [(re.compile(r"(?<![\d=<-])\d(?:[ -]?\d){12,18}(?![\d-]|\s*=)"), _card_ok)],
    "email": [(re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"), lambda s: True)],
    "ip": [(re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"), lambda s: True),
           (re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _ipv6_ok)],
    # A phone number ends in a group of 4 digits and is not part of a longer run of digit groups (a card
    # or an ID number) nor of arithmetic; separators are a space, dot or hyphen, never a line break.
    "phone": [(re.compile(r"(?<![\w+=<])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-])"
                          r"\d{2,4}[ .-]\d{4}(?![ .-]?\d|\s*=)"),
               _phone_ok)],
}
PLACEHOLDERS = {"credit_card": "<CREDIT_CARD>", "email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>"}


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = ALL_KINDS) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of PII in `text`, sorted by start."""
    spans: list[tuple[int, int, str]] = []
    for kind in ALL_KINDS:
        if kind not in kinds:
            continue
        for pattern, ok in PATTERNS[kind]:
            for m in pattern.finditer(text):
                s, e = m.span()
                if ok(m.group()) and not any(s < e2 and s2 < e for s2, e2, _ in spans):
                    spans.append((s, e, kind))
    return sorted(spans)


def redact_pii(text: str, kinds: tuple[str, ...] | list[str] = ALL_KINDS) -> tuple[str, Counter]:
    """`text` with each PII span replaced by its placeholder, and the count per kind."""
    counts: Counter = Counter()
    out, last = [], 0
    for s, e, kind in find_pii(text, kinds):
        out.append(text[last:s])
        out.append(PLACEHOLDERS[kind])
        counts[kind] += 1
        last = e
    out.append(text[last:])
    return "".join(out), counts


@dataclass
class PiiConfig:
    """PII handling: which kinds to look for and what to do with a document that has them."""

    enabled: bool = True
    """Run PII detection."""
    kinds: list[str] = field(default_factory=lambda: list(ALL_KINDS))
    """Kinds to detect: any of credit_card, email, ip, phone."""
    action: Literal["redact", "drop", "flag"] = "redact"
    """redact: replace spans with placeholders; drop: remove the document; flag: only annotate meta['pii']."""

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad:
            raise ValueError(f"pii.kinds has {bad[0]!r}; allowed: {', '.join(ALL_KINDS)}")


class PiiFilter:
    """Redact, drop (reason 'pii:<kind>') or flag documents containing PII; counts redactions per kind."""

    def __init__(self, cfg: PiiConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: list[Doc]) -> StepResult:
        kept, dropped, modified = [], [], Counter()
        for doc in batch:
            redacted, counts = redact_pii(doc["text"], self.cfg.kinds)
            if not counts:
                kept.append(doc)
            elif self.cfg.action == "drop":
                dropped.append((doc, f"pii:{counts.most_common(1)[0][0]}"))
            elif self.cfg.action == "redact":
                kept.append({**doc, "text": redacted})
                modified.update(counts)
            else:
                kept.append({**doc, "meta": {**doc["meta"], "pii": dict(counts)}})
                modified.update(counts)
        return StepResult(kept, dropped, modified)
