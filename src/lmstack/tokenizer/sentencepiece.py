"""A SentencePiece tokenizer.model (Llama-2 / Mistral-v0.1 style BPE with byte fallback) -> a tokenizer.json spec.

We convert rather than run the `sentencepiece` package at runtime: the converted spec goes through the same
Tokenizer as every other (our Python reference encoder, the Rust fast path, decode, save as tokenizer.json,
chat templates), and loading needs no extra dependency, because the .model file's protobuf is read by the
small wire-format reader below (the three messages and the dozen fields that matter).

The conversion is transformers 5's for LlamaTokenizer (`SentencePieceExtractor` + `generate_merges` +
`LlamaTokenizer.__init__`), so ids equal its fast tokenizer and, on ordinary text, its slow SentencePiece
backend and the `sentencepiece` package itself (tests/tokenizer/test_sentencepiece.py: 2,000 UDHR lines):
- vocab: every piece at its id; BPE merges: every split (left, right) of a piece into two pieces, ordered by
  the piece's score (higher first), then longer left, then longer right, as transformers orders them;
- byte_fallback from the trainer spec (unknown characters -> <0xNN> pieces), unk fused;
- Metaspace pre-tokenizer: spaces -> '▁', one '▁' prepended to the text (add_dummy_prefix), no splitting;
- decoder: '▁' -> ' ', byte pieces -> bytes, fused, the leading space stripped;
- the UNKNOWN and CONTROL pieces (<unk>, <s>, </s>) become special added tokens, USER_DEFINED pieces plain
  added tokens; tokenizer_config gets unk/bos/eos/pad_token from the trainer spec unless it names its own;
- add_bos_token / add_eos_token from tokenizer_config.json make the post-processor (special_tokens.py).
Like transformers' fast LlamaTokenizer we do not reproduce a non-identity SentencePiece normalizer
(nmt_nfkc's precompiled charsmap) or remove_extra_whitespaces: Llama-2 and Mistral use neither. Unigram
models (T5 style) are refused with a message that says so.

Usage:
    spec, config = convert_sentencepiece("llama2/tokenizer.model")      # dicts: tokenizer.json, tokenizer_config
    tok = lmstack.load_tokenizer("llama2/")                             # a directory with only tokenizer.model works
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from lmstack.errors import LmstackError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
MAX_BYTES = 64 << 20  # a real tokenizer.model is a few MB


def _fields(buf: bytes, where: str):
    """Yield (field number, wire type, value) of one protobuf message; value is int or bytes."""
    pos, n = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        out = shift = 0
        while True:
            if pos >= n or shift > 63:
                raise LmstackError(f"{where} is not a SentencePiece model: a truncated or malformed varint")
            b = buf[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size = varint()
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise LmstackError(f"{where} is not a SentencePiece model: protobuf wire type {wire} at field {field}")
        if pos > n:
            raise LmstackError(f"{where} is not a SentencePiece model: a field runs past the end of the file")
        yield field, wire, value


def read_model_proto(data: bytes, where: str = "tokenizer.model") -> dict:
    """The parts of sentencepiece's ModelProto the conversion needs."""
    pieces: list[tuple[str, float, int]] = []
    trainer = {"model_type": 1, "byte_fallback": False, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    normalizer = {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True, "charsmap": b""}
    t_fields = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    for field, wire, value in _fields(data, where):
        if field == 1 and wire == 2:
            piece, score, kind = None, 0.0, NORMAL
            for f, w, v in _fields(value, where):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8", errors="strict")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            if piece is None:
                raise LmstackError(f"{where}: piece #{len(pieces)} has no text")
            pieces.append((piece, score, kind))
        elif field == 2 and wire == 2:
            for f, w, v in _fields(value, where):
                if f in t_fields and w == 0:
                    v = v - (1 << 64) if v >= 1 << 63 else v  # int32 -1 is sent as a 10-byte varint
                    trainer[t_fields[f]] = bool(v) if f == 35 else v
        elif field == 3 and wire == 2:
            for f, w, v in _fields(value, where):
                if f == 1 and w == 2:
                    normalizer["name"] = v.decode("utf-8", errors="replace")
                elif f == 2 and w == 2:
                    normalizer["charsmap"] = v
                elif f in (3, 4) and w == 0:
                    normalizer["add_dummy_prefix" if f == 3 else "remove_extra_whitespaces"] = bool(v)
    if not pieces:
        raise LmstackError(f"{where} is not a SentencePiece model: it has no pieces")
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[list[str]]:
    """BPE merges from a scored vocabulary: each piece's two-piece splits, best-scored piece first."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, as transformers sorts
    return [[a, b] for a, b, _ in merges]


def convert_sentencepiece(path: str | os.PathLike, config: dict | None = None) -> tuple[dict, dict]:
    """tokenizer.model -> (tokenizer.json spec, tokenizer_config dict with the special-token roles filled)."""
    # lazy: heavy (torch), which the tokenizer package does not import at its top
    from lmstack.model.load_guard import check_regular

    path = Path(path)
    check_regular(path, "tokenizer model", MAX_BYTES)
    proto = read_model_proto(path.read_bytes(), str(path))
    kind = MODEL_TYPES.get(proto["trainer"]["model_type"], str(proto["trainer"]["model_type"]))
    if kind != "bpe":
        raise LmstackError(f"{path}: a SentencePiece {kind} model; only BPE models (Llama-2, Mistral-v0.1 style) "
                           "load from tokenizer.model; give a tokenizer.json for this one")
    pieces = proto["pieces"]
    vocab = {}
    for i, (piece, _, _) in enumerate(pieces):
        vocab.setdefault(piece, i)
    scores = {piece: score for piece, score, _ in pieces}
    trainer = proto["trainer"]
    role_ids = {"unk_token": trainer["unk_id"], "bos_token": trainer["bos_id"], "eos_token": trainer["eos_id"],
                "pad_token": trainer["pad_id"]}
    unk = pieces[trainer["unk_id"]][0] if 0 <= trainer["unk_id"] < len(pieces) else None
    added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind_ != USER_DEFINED}
             for i, (piece, _, kind_) in enumerate(pieces) if kind_ in (UNKNOWN, CONTROL, USER_DEFINED)]
    prefix = proto["normalizer"]["add_dummy_prefix"]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "first" if prefix else "never", "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(trainer["byte_fallback"]),
                  "ignore_merges": False, "vocab": vocab, "merges": generate_merges(vocab, scores)},
    }
    config = dict(config or {})
    for key, i in role_ids.items():
        if key not in config and 0 <= i < len(pieces):
            config[key] = pieces[i][0]
    return spec, config
