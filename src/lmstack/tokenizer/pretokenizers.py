"""Pre-tokenizers: cut normalized text into the pieces a subword model sees, with HF `tokenizers` semantics.

Each class is built from its `tokenizer.json` entry (`pretokenizer_from_json`) and behaves like the Rust
component of the same name, so ids match the `tokenizers` runtime. Our named presets (gpt2, gpt4,
hybrid digits, metaspace, bert, morpheme-aware) are built as such JSON entries in `presets.py`.

Usage:
    pt = pretokenizer_from_json({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    pt(["Hello world"], True)      # -> ['Hello', 'Ġworld']

A pre-tokenizer is called as `pt(pieces, first)`: `pieces` are the current splits of one text segment and
`first` says whether pieces[0] starts at offset 0 of the whole input (Metaspace's "first" scheme needs it).
"""
from __future__ import annotations

import unicodedata
from typing import Callable

import regex

from lmstack.errors import LmstackError

# GPT-2's split pattern (also what the ByteLevel pre-tokenizer uses when use_regex is on).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's cl100k pattern: case-insensitive contractions, numbers in groups of at most 3 digits,
# newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Hybrid for code and math: like GPT-4 but every digit is its own piece (LLaMA does this), so numbers are
# always spelled digit by digit and arithmetic sees aligned digits.
GPT4_DIGITS_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            # Bytes that would print as whitespace or control characters get a code point above 255.
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table over latin-1 decoded bytes: one C call maps a whole piece to byte-level characters.
_LATIN1_TO_BYTELEVEL = {b: c for b, c in BYTE_TO_CHAR.items()}


def to_byte_level(piece: str) -> str:
    return piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTELEVEL)


def _is_whitespace(c: str) -> bool:
    # Rust's char::is_whitespace is the Unicode White_Space property, which `regex`'s \s matches too.
    return _WS.match(c) is not None


_WS = regex.compile(r"\s")


def _is_punctuation(c: str) -> bool:
    # BERT's punctuation: any ASCII punctuation or any Unicode P* category.
    return (c.isascii() and not c.isalnum() and c.isprintable() and not c.isspace()) or unicodedata.category(
        c
    ).startswith("P")


def _find_spans(rx: regex.Pattern, s: str) -> list[tuple[int, int, bool]]:
    """Cover `s` with (start, end, is_match) spans, like HF's Pattern::find_matches."""
    spans, prev = [], 0
    for m in rx.finditer(s):
        a, b = m.span()
        if a > prev:
            spans.append((prev, a, False))
        spans.append((a, b, True))
        prev = b
    if prev < len(s):
        spans.append((prev, len(s), False))
    return spans


def _char_spans(pred: Callable[[str], bool], s: str) -> list[tuple[int, int, bool]]:
    spans, start = [], 0
    for i, c in enumerate(s):
        if pred(c):
            if start < i:
                spans.append((start, i, False))
            spans.append((i, i + 1, True))
            start = i + 1
    if start < len(s):
        spans.append((start, len(s), False))
    return spans


def _apply_behavior(spans: list[tuple[int, int, bool]], behavior: str) -> list[tuple[int, int]]:
    """Turn match spans into kept (start, end) splits, following SplitDelimiterBehavior."""
    if behavior == "Isolated":
        return [(a, b) for a, b, _ in spans]
    if behavior == "Removed":
        return [(a, b) for a, b, m in spans if not m]
    out: list[list[int]] = []
    if behavior == "Contiguous":
        prev = False
        for a, b, m in spans:
            if out and m == prev:
                out[-1][1] = b
            else:
                out.append([a, b])
            prev = m
    elif behavior == "MergedWithPrevious":
        prev = False
        for a, b, m in spans:
            if m and not prev and out:
                out[-1][1] = b
            else:
                out.append([a, b])
            prev = m
    elif behavior == "MergedWithNext":
        prev = False
        for a, b, m in reversed(spans):
            if m and not prev and out:
                out[-1][0] = a
            else:
                out.append([a, b])
            prev = m
        out.reverse()
    else:
        raise LmstackError(f"unknown split behavior {behavior!r}; allowed: Isolated, Removed, Contiguous, "
                           "MergedWithPrevious, MergedWithNext")
    return [(a, b) for a, b in out]


def _split_all(pieces: list[str], first: bool, spans_of: Callable[[str], list], behavior: str):
    out: list[str] = []
    first_out = first
    for k, p in enumerate(pieces):
        kept = [(a, b) for a, b in _apply_behavior(spans_of(p), behavior) if b > a]
        if k == 0 and kept and kept[0][0] != 0:
            first_out = False  # the leading part of the input was removed
        out.extend(p[a:b] for a, b in kept)
    return out, first_out


class PreTokenizer:
    def __init__(self, **_):
        pass  # fields HF writes but this step does not use

    piecewise = False
    """True when the step maps each piece to exactly one piece independently (counting can run before it)."""

    def split(self, pieces: list[str], first: bool) -> tuple[list[str], bool]:
        raise NotImplementedError

    def __call__(self, pieces: list[str], first: bool = True) -> list[str]:
        return self.split(pieces, first)[0]


class ByteLevel(PreTokenizer):
    def __init__(self, add_prefix_space: bool = True, use_regex: bool = True, **_):
        self.add_prefix_space = add_prefix_space
        self.use_regex = use_regex
        self.piecewise = not add_prefix_space and not use_regex
        self._rx = regex.compile(GPT2_PATTERN)

    def split(self, pieces, first):
        if self.add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if self.use_regex:
            pieces, first = _split_all(pieces, first, lambda s: _find_spans(self._rx, s), "Isolated")
        return [to_byte_level(p) for p in pieces], first


class Split(PreTokenizer):
    def __init__(self, pattern: dict, behavior: str, invert: bool = False, **_):
        if not isinstance(pattern, dict) or len(pattern) != 1 or next(iter(pattern)) not in ("String", "Regex"):
            raise LmstackError(f"Split pattern must be {{'String': ...}} or {{'Regex': ...}}, got {pattern!r}")
        kind, value = next(iter(pattern.items()))
        try:
            self.rx = regex.compile(regex.escape(value) if kind == "String" else value)
        except regex.error as e:
            raise LmstackError(f"Split regex {value!r} does not compile: {e}") from None
        self.behavior, self.invert = behavior, invert
        _apply_behavior([], behavior)  # validates the name

    def spans(self, s: str):
        spans = _find_spans(self.rx, s)
        return [(a, b, not m) for a, b, m in spans] if self.invert else spans

    def split(self, pieces, first):
        if self.behavior == "Isolated" and not self.invert:
            # Fast path: when the matches tile the piece (true for the GPT patterns), findall is the answer.
            out = []
            for p in pieces:
                found = self.rx.findall(p)
                if found and sum(map(len, found)) == len(p) and all(found):
                    out.extend(found)
                else:
                    out.extend(p[a:b] for a, b, _ in _find_spans(self.rx, p) if b > a)
            return out, first
        return _split_all(pieces, first, self.spans, self.behavior)


class Metaspace(PreTokenizer):
    """SentencePiece's view of text: spaces become a visible '▁', so no whitespace assumption is made."""

    def __init__(self, replacement: str = "\u2581", prepend_scheme: str | None = None, split: bool = True,
                 add_prefix_space: bool | None = None, **_):
        if prepend_scheme is None:
            prepend_scheme = "never" if add_prefix_space is False else "always"
        if prepend_scheme not in ("always", "first", "never"):
            raise LmstackError(f"Metaspace prepend_scheme={prepend_scheme!r}; allowed: always, first, never")
        self.replacement, self.prepend_scheme, self.split_words = replacement, prepend_scheme, split

    def split(self, pieces, first):
        r = self.replacement
        out = []
        for k, p in enumerate(pieces):
            p = p.replace(" ", r)
            if not p.startswith(r) and (self.prepend_scheme == "always" or
                                        (self.prepend_scheme == "first" and k == 0 and first)):
                p = r + p
            if self.split_words:
                out.extend(p[a:b] for a, b in _apply_behavior(_char_spans(lambda c: c == r, p), "MergedWithNext")
                           if b > a)
            elif p:
                out.append(p)
        return out, first


class BertPreTokenizer(PreTokenizer):
    def split(self, pieces, first):
        pieces, first = _split_all(pieces, first, lambda s: _char_spans(_is_whitespace, s), "Removed")
        return _split_all(pieces, first, lambda s: _char_spans(_is_punctuation, s), "Isolated")


class Whitespace(PreTokenizer):
    _rx = regex.compile(r"\w+|[^\w\s]+")

    def split(self, pieces, first):
        return _split_all(pieces, first, lambda s: [(a, b, not m) for a, b, m in _find_spans(self._rx, s)],
                          "Removed")


class WhitespaceSplit(PreTokenizer):
    def split(self, pieces, first):
        return _split_all(pieces, first, lambda s: _char_spans(_is_whitespace, s), "Removed")


class Punctuation(PreTokenizer):
    def __init__(self, behavior: str = "Isolated", **_):
        self.behavior = behavior

    def split(self, pieces, first):
        return _split_all(pieces, first, lambda s: _char_spans(_is_punctuation, s), self.behavior)


class Digits(PreTokenizer):
    def __init__(self, individual_digits: bool = False, **_):
        self.individual = individual_digits

    def split(self, pieces, first):
        # Rust's char::is_numeric: Unicode categories Nd, Nl and No.
        is_num = lambda c: unicodedata.category(c) in ("Nd", "Nl", "No")  # noqa: E731
        behavior = "Isolated" if self.individual else "Contiguous"
        return _split_all(pieces, first, lambda s: _char_spans(is_num, s), behavior)


class CharDelimiterSplit(PreTokenizer):
    def __init__(self, delimiter: str, **_):
        self.delimiter = delimiter

    def split(self, pieces, first):
        return _split_all(pieces, first, lambda s: _char_spans(lambda c: c == self.delimiter, s), "Removed")


class Sequence(PreTokenizer):
    def __init__(self, pretokenizers: list, **_):
        self.steps = [pretokenizer_from_json(p) for p in pretokenizers]

    def split(self, pieces, first):
        for step in self.steps:
            pieces, first = step.split(pieces, first)
        return pieces, first


PRETOKENIZERS: dict[str, type[PreTokenizer]] = {
    "ByteLevel": ByteLevel, "Split": Split, "Metaspace": Metaspace, "BertPreTokenizer": BertPreTokenizer,
    "Whitespace": Whitespace, "WhitespaceSplit": WhitespaceSplit, "Punctuation": Punctuation,
    "Digits": Digits, "CharDelimiterSplit": CharDelimiterSplit, "Sequence": Sequence,
}


def pretokenizer_from_json(spec: dict | None) -> PreTokenizer | None:
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in PRETOKENIZERS:
        raise LmstackError(f"unsupported pre_tokenizer type {kind!r}; supported: {', '.join(PRETOKENIZERS)}")
    args = {k: v for k, v in spec.items() if k != "type"}
    try:
        return PRETOKENIZERS[kind](**args)
    except TypeError as e:
        raise LmstackError(f"pre_tokenizer {kind} has bad fields: {e}") from None


def split_counting_stages(pt: PreTokenizer | None) -> tuple[Callable[..., list[str]], Callable[[str], str] | None]:
    """Split a pre-tokenizer into (text, first -> pieces) and (piece -> piece) so callers can count or cache
    raw pieces before the per-piece tail (e.g. the byte-level mapping) runs. The tail is None when empty."""
    if pt is None:
        return (lambda s, first=True: [s] if s else []), None
    steps = pt.steps if isinstance(pt, Sequence) else [pt]
    cut = len(steps)
    while cut > 0 and steps[cut - 1].piecewise:
        cut -= 1
    head, tail = steps[:cut], steps[cut:]

    def run_head(s: str, first: bool = True) -> list[str]:
        pieces = [s] if s else []
        for step in head:
            pieces, first = step.split(pieces, first)
        return pieces

    if not tail:
        return run_head, None

    def run_tail(piece: str) -> str:
        pieces = [piece]
        for step in tail:
            pieces, _ = step.split(pieces, False)
        return pieces[0]

    return run_head, run_tail
