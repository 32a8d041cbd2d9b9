"""Decoders: turn a list of token strings back into text, with the semantics of HF `tokenizers`.

Usage:
    dec = decoder_from_json({"type": "ByteLevel"})
    dec(["Hello", "Ġworld"])          # -> 'Hello world'

Each decoder implements `chain(tokens) -> tokens`; the text is the concatenation of the last chain.
"""
from __future__ import annotations

import regex

from lmstack.errors import LmstackError
from lmstack.tokenizer.pretokenizers import CHAR_TO_BYTE


class Decoder:
    def __init__(self, **_):
        pass  # fields HF writes but this step does not use

    def chain(self, tokens: list[str]) -> list[str]:
        raise NotImplementedError

    def __call__(self, tokens: list[str]) -> str:
        return "".join(self.chain(list(tokens)))


class ByteLevel(Decoder):
    def chain(self, tokens):
        out = bytearray()
        for t in tokens:
            try:
                out.extend([CHAR_TO_BYTE[c] for c in t])
            except KeyError:
                out.extend(t.encode("utf-8"))  # not byte-level (e.g. a special token): its own bytes
        return [out.decode("utf-8", errors="replace")]


class WordPiece(Decoder):
    def __init__(self, prefix: str = "##", cleanup: bool = True, **_):
        self.prefix, self.cleanup = prefix, cleanup

    def chain(self, tokens):
        out = []
        for i, t in enumerate(tokens):
            if i:
                t = t[len(self.prefix):] if t.startswith(self.prefix) else " " + t
            if self.cleanup:
                t = cleanup(t)
            out.append(t)
        return out


def cleanup(s: str) -> str:
    """BERT's detokenization cleanup (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s


class Metaspace(Decoder):
    def __init__(self, replacement: str = "\u2581", prepend_scheme: str | None = None,
                 add_prefix_space: bool | None = None, **_):
        if prepend_scheme is None:
            prepend_scheme = "never" if add_prefix_space is False else "always"
        self.replacement, self.prepend_scheme = replacement, prepend_scheme

    def chain(self, tokens):
        r = self.replacement
        drop_first = self.prepend_scheme != "never"
        return [t.replace(r, "") if i == 0 and drop_first else t.replace(r, " ") for i, t in enumerate(tokens)]


class BPEDecoder(Decoder):
    def __init__(self, suffix: str = "</w>", **_):
        self.suffix = suffix

    def chain(self, tokens):
        n = len(tokens) - 1
        return [t.replace(self.suffix, "" if i == n else " ") for i, t in enumerate(tokens)]


class ByteFallback(Decoder):
    def chain(self, tokens):
        out, pending = [], bytearray()

        def flush():
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.extend("\ufffd" * len(pending))
                pending.clear()

        for t in tokens:
            if len(t.encode("utf-8")) == 6 and t.startswith("<0x") and t.endswith(">"):
                try:
                    pending.append(int(t[3:5], 16))
                    continue
                except ValueError:
                    pass
            flush()
            out.append(t)
        flush()
        return out


class Fuse(Decoder):
    def chain(self, tokens):
        return ["".join(tokens)]


class Strip(Decoder):
    def __init__(self, content: str = " ", start: int = 0, stop: int = 0, **_):
        self.content, self.start, self.stop = content, start, stop

    def chain(self, tokens):
        out = []
        for t in tokens:
            a = 0
            while a < min(self.start, len(t)) and t[a] == self.content:
                a += 1
            b = len(t)
            for _ in range(self.stop):
                if b > a and t[b - 1] == self.content:
                    b -= 1
                else:
                    break
            out.append(t[a:b])
        return out


class Replace(Decoder):
    def __init__(self, pattern: dict, content: str, **_):
        kind, value = next(iter(pattern.items()))
        self.rx = regex.compile(regex.escape(value) if kind == "String" else value)
        self.content = content

    def chain(self, tokens):
        return [self.rx.sub(lambda m: self.content, t) for t in tokens]


class Sequence(Decoder):
    def __init__(self, decoders: list, **_):
        self.steps = [decoder_from_json(d) for d in decoders]

    def chain(self, tokens):
        for step in self.steps:
            tokens = step.chain(tokens)
        return tokens


DECODERS = {"ByteLevel": ByteLevel, "WordPiece": WordPiece, "Metaspace": Metaspace, "BPEDecoder": BPEDecoder,
            "ByteFallback": ByteFallback, "Fuse": Fuse, "Strip": Strip, "Replace": Replace, "Sequence": Sequence}


def decoder_from_json(spec: dict | None) -> Decoder | None:
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in DECODERS:
        raise LmstackError(f"unsupported decoder type {kind!r}; supported: {', '.join(DECODERS)}")
    try:
        return DECODERS[kind](**{k: v for k, v in spec.items() if k != "type"})
    except (TypeError, StopIteration, regex.error) as e:
        raise LmstackError(f"decoder {kind} has bad fields: {e}") from None
