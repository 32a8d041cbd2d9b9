"""Multi-vocabulary tokenization: code/math spans and prose spans use different sub-vocabularies in one id space.

A cheap line-level detector labels each line as code/math or prose (indentation, code keywords, density of
operator/bracket/digit characters). Consecutive lines with the same label form a span; prose spans are
encoded by the prose BPE (ids [0, P)) and code spans by the code BPE (ids [P, P + C)). Both are byte-level,
so either can encode anything and decoding just concatenates each token's bytes: the round trip is exact.
A model sees one vocabulary of P + C ids.

Usage:
    mv = train_multivocab(texts, prose_vocab=2048, code_vocab=1024)
    ids = mv.encode("Add the numbers:\\n    total = a + b\\n")
    mv.decode(ids)                     # the same text
    mv.vocab_size                      # 3072
"""
from __future__ import annotations

import json
from pathlib import Path

import regex

from lmstack.config import atomic_write_text
from lmstack.errors import LmstackError
from lmstack.tokenizer.core import Tokenizer, load_tokenizer
from lmstack.tokenizer.pretokenizers import CHAR_TO_BYTE
from lmstack.tokenizer.train import train_tokenizer

_KEYWORDS = regex.compile(r"^\s*(def|class|return|import|from|if|for|while|elif|else|try|except|with|lambda|"
                          r"print|assert|yield|raise|pass)\b")
_SYMBOLS = set("{}[]()=<>;:+-*/%^&|_#\\$@~`0123456789")


def is_code_line(line: str, threshold: float = 0.25) -> bool:
    """Indented, starts with a code keyword, or dense in operators/brackets/digits (math)."""
    stripped = line.strip()
    if not stripped:
        return False
    if line.startswith(("    ", "\t")) or _KEYWORDS.match(line):
        return True
    return sum(c in _SYMBOLS for c in stripped) / len(stripped) >= threshold


def split_spans(text: str, threshold: float = 0.25) -> list[tuple[str, bool]]:
    """Cut text into (span, is_code) runs of whole lines; blank lines join the span before them."""
    spans: list[list] = []
    for line in text.splitlines(keepends=True):
        code = is_code_line(line, threshold) if line.strip() else (spans[-1][1] if spans else False)
        if spans and spans[-1][1] == code:
            spans[-1][0] += line
        else:
            spans.append([line, code])
    return [(s, c) for s, c in spans]


def _token_bytes(tok: Tokenizer) -> list[bytes]:
    out = []
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i) or ""
        if i in tok.special_ids or any(c not in CHAR_TO_BYTE for c in s):
            out.append(s.encode("utf-8"))
        else:
            out.append(bytes(CHAR_TO_BYTE[c] for c in s))
    return out


class MultiVocabTokenizer:
    def __init__(self, prose: Tokenizer, code: Tokenizer, threshold: float = 0.25):
        for name, t in (("prose", prose), ("code", code)):
            if t.spec["decoder"] is None or t.spec["decoder"].get("type") != "ByteLevel":
                raise LmstackError(f"the {name} sub-tokenizer must be a byte-level BPE")
        self.prose, self.code, self.threshold = prose, code, threshold
        self.offset = prose.vocab_size
        self._bytes = _token_bytes(prose) + _token_bytes(code)

    @property
    def vocab_size(self) -> int:
        return self.offset + self.code.vocab_size

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        ids: list[int] = []
        for seg, tid, _ in self.prose._split_added(text, self.prose._raw_rx, allow_special):
            if tid is not None:
                ids.append(tid)
                continue
            for span, code in split_spans(seg, self.threshold):
                if code:
                    ids.extend(i + self.offset for i in self.code.encode(span, allow_special=False))
                else:
                    ids.extend(self.prose.encode(span, allow_special=False))
        return ids

    def decode(self, ids: list[int]) -> str:
        try:
            return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size)
            raise LmstackError(f"token id {bad!r} is not in this tokenizer (vocab size {self.vocab_size})") from None

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        self.prose.save(d / "prose")
        self.code.save(d / "code")
        atomic_write_text(d / "multivocab.json", json.dumps({"threshold": self.threshold, "offset": self.offset}))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "MultiVocabTokenizer":
        d = Path(directory)
        if not (d / "multivocab.json").is_file():
            raise LmstackError(f"{d} is not a multi-vocabulary tokenizer (no multivocab.json)")
        meta = json.loads((d / "multivocab.json").read_text(encoding="utf-8"))
        return cls(load_tokenizer(d / "prose"), load_tokenizer(d / "code"), meta.get("threshold", 0.25))


def train_multivocab(texts: list[str], prose_vocab: int, code_vocab: int, threshold: float = 0.25,
                     **kwargs) -> MultiVocabTokenizer:
    """Split the corpus with the detector and train one byte-level BPE per side (code side: digits split)."""

    space_runs = kwargs.pop("space_runs", 16)
    prose, code = [], []
    for t in texts:
        for span, is_code in split_spans(t, threshold):
            (code if is_code else prose).append(span)
    if not prose or not code:
        raise LmstackError("train_multivocab needs both prose and code/math lines in the corpus")
    p = train_tokenizer(texts=prose, type="bpe", vocab_size=prose_vocab, **kwargs)
    c = train_tokenizer(texts=code, type="bpe", vocab_size=code_vocab, special_tokens="none",
                        split_digits=True, space_runs=space_runs, **kwargs)
    return MultiVocabTokenizer(p, c, threshold)
