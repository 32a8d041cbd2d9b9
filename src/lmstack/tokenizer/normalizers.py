"""Normalizers: rewrite text before pre-tokenization, with the semantics of HF `tokenizers`.

Built from the `normalizer` entry of a tokenizer.json. Our own tokenizers mostly use none (byte-level BPE
and SentencePiece-style tokenizers must stay lossless); BERT-style WordPiece uses BertNormalizer.

Usage:
    norm = normalizer_from_json({"type": "BertNormalizer", "lowercase": True})
    norm("Héllo\\tWorld")   # -> 'hello world'
"""
from __future__ import annotations

import unicodedata

import regex

from lmstack.errors import LmstackError

_WS = regex.compile(r"\s")


def _is_other(c: str) -> bool:
    # HF's is_other(): control, format, private use, surrogate. Unassigned code points (Cn) are kept, as the
    # Rust crate does (checked over every code point in the tests' parity sweep).
    return unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def _is_chinese(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _strip_marks(s: str) -> str:
    return "".join(c for c in s if unicodedata.category(c) != "Mn")


class Normalizer:
    def __call__(self, s: str) -> str:
        raise NotImplementedError


class BertNormalizer(Normalizer):
    def __init__(self, clean_text: bool = True, handle_chinese_chars: bool = True,
                 strip_accents: bool | None = None, lowercase: bool = True, **_):
        self.clean_text, self.handle_chinese_chars = clean_text, handle_chinese_chars
        # As in BERT: accents are stripped when lowercasing unless told otherwise.
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.lowercase = lowercase

    def __call__(self, s: str) -> str:
        if self.clean_text:
            out = []
            for c in s:
                # Drop controls first (\x0b, \x85 are controls *and* whitespace: HF drops them), then map
                # the remaining whitespace to a plain space.
                if c in "\t\n\r":
                    out.append(" ")
                elif c == "\0" or c == "\ufffd" or _is_other(c):
                    continue
                elif _WS.match(c):
                    out.append(" ")
                else:
                    out.append(c)
            s = "".join(out)
        if self.handle_chinese_chars:
            s = "".join(f" {c} " if _is_chinese(ord(c)) else c for c in s)
        if self.strip_accents:
            s = _strip_marks(unicodedata.normalize("NFD", s))
        if self.lowercase:
            s = s.lower()
        return s


class Unicode(Normalizer):
    def __init__(self, form: str):
        self.form = form

    def __call__(self, s: str) -> str:
        return unicodedata.normalize(self.form, s)


class Lowercase(Normalizer):
    def __call__(self, s: str) -> str:
        return s.lower()


class StripAccents(Normalizer):
    def __call__(self, s: str) -> str:
        return _strip_marks(s)


class Strip(Normalizer):
    def __init__(self, strip_left: bool = True, strip_right: bool = True, **_):
        self.left, self.right = strip_left, strip_right

    def __call__(self, s: str) -> str:
        if self.left:
            s = regex.sub(r"^\s+", "", s)
        if self.right:
            s = regex.sub(r"\s+$", "", s)
        return s


class Replace(Normalizer):
    def __init__(self, pattern: dict, content: str, **_):
        kind, value = next(iter(pattern.items()))
        self.rx = regex.compile(regex.escape(value) if kind == "String" else value)
        self.content = content

    def __call__(self, s: str) -> str:
        return self.rx.sub(lambda m: self.content, s)


class Prepend(Normalizer):
    def __init__(self, prepend: str, **_):
        self.prepend = prepend

    def __call__(self, s: str) -> str:
        return self.prepend + s if s else s


class Nmt(Normalizer):
    _drop = set(range(0x1, 0x9)) | {0xB} | set(range(0xE, 0x20)) | {0x7F, 0x8F, 0x9F}
    _space = {0x9, 0xA, 0xC, 0xD, 0x1680, *range(0x200B, 0x2010), 0x2028, 0x2029, 0x2581, 0xFEFF, 0xFFFD}

    def __call__(self, s: str) -> str:
        return "".join(" " if ord(c) in self._space else c for c in s if ord(c) not in self._drop)


class Sequence(Normalizer):
    def __init__(self, normalizers: list, **_):
        self.steps = [normalizer_from_json(n) for n in normalizers]

    def __call__(self, s: str) -> str:
        for step in self.steps:
            s = step(s)
        return s


NORMALIZERS = {
    "BertNormalizer": BertNormalizer,
    "NFC": lambda **_: Unicode("NFC"), "NFD": lambda **_: Unicode("NFD"),
    "NFKC": lambda **_: Unicode("NFKC"), "NFKD": lambda **_: Unicode("NFKD"),
    "Lowercase": lambda **_: Lowercase(), "StripAccents": lambda **_: StripAccents(),
    "Strip": Strip, "Replace": Replace, "Prepend": Prepend, "Nmt": lambda **_: Nmt(), "Sequence": Sequence,
}


def normalizer_from_json(spec: dict | None) -> Normalizer | None:
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in NORMALIZERS:
        raise LmstackError(f"unsupported normalizer type {kind!r}; supported: {', '.join(NORMALIZERS)}")
    try:
        return NORMALIZERS[kind](**{k: v for k, v in spec.items() if k != "type"})
    except (TypeError, StopIteration, regex.error) as e:
        raise LmstackError(f"normalizer {kind} has bad fields: {e}") from None
