"""The tokenizer a shard writer uses, loaded from a spec string so worker processes can load it too.

Shard writing needs an object with `encode_batch(texts) -> list[list[int]]`, `bos_id`, `eos_id`
and `vocab_size`. Workers never receive a pickled tokenizer: they get the spec string and load it
themselves. Specs:
- "bytes": the built-in byte-level tokenizer (ids 0-255 are UTF-8 bytes, 256 = BOS, 257 = EOS);
  needs no training, so the pipeline runs out of the box;
- a path to a tokenizer directory or tokenizer.json: loaded with lmstack.tokenizer.load_tokenizer
  when that package provides it, else with the HF `tokenizers` library (BOS/EOS found by the usual
  special-token names, or given explicitly).

Usage:
    from lmstack.data.shard_tokenizer import load_shard_tokenizer
    tok = load_shard_tokenizer("bytes")
    tok.encode_batch(["hi"])     # [[104, 105]]
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from lmstack.errors import LmstackError

BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>")


class ShardTokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus BOS (256) and EOS (257): a real, training-free tokenizer."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizerFile:
    """Adapter over a `tokenizers.Tokenizer` loaded from tokenizer.json."""

    def __init__(self, path: Path, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own exception type
            raise LmstackError(f"{path} is not a tokenizer.json file: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos_token, BOS_NAMES)
        self.eos_id = self._find(eos_token, EOS_NAMES)

    def _find(self, given: str, names: tuple[str, ...]) -> int | None:
        for name in ((given,) if given else names):
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        if given:
            raise LmstackError(f"special token {given!r} is not in the tokenizer's vocabulary")
        return None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _tokenizer_file(path: Path) -> Path:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise LmstackError(f"no tokenizer at {path} (expected 'bytes', a tokenizer.json, or a directory holding one)")
    return file


def load_shard_tokenizer(spec: str, bos_token: str = "", eos_token: str = "") -> Any:
    """Load the tokenizer named by `spec` ('bytes' or a path)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    file = _tokenizer_file(path)
    loader = getattr(importlib.import_module("lmstack.tokenizer"), "load_tokenizer", None)
    if loader is not None and not (bos_token or eos_token):
        tok = loader(path)
        if all(hasattr(tok, a) for a in ("encode_batch", "bos_id", "eos_id", "vocab_size")):
            return tok
    return HFTokenizerFile(file, bos_token, eos_token)


def tokenizer_fingerprint(spec: str) -> str:
    """What identifies the tokenizer in a manifest: 'bytes', or the sha256 of its tokenizer.json."""
    if spec == "bytes":
        return "bytes"
    return hashlib.sha256(_tokenizer_file(Path(spec)).read_bytes()).hexdigest()
