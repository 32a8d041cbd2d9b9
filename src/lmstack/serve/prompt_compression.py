"""Prompt compression in the server: a small scorer LM drops a prompt's predictable words before prefill.

The technique is lmstack.infer.prompt_compression (LLMLingua-style self-information pruning, plus
canonical reformatting); this module decides where the server applies it.

Server side, `CompressionConfig` (nested in ServerConfig as `compression`):
    lmstack serve --model runs/big --compression.model runs/small              # requests may opt in
    lmstack serve --model runs/big --compression.model runs/small --compression.rate 0.5   # on for all
  The scorer is loaded at start-up on the served model's device; its tokenizer.json must hold the served
  tokenizer's vocabulary, token for token (checked then: a scorer that reads other ids would score noise).

Request side, an extension field (like vLLM's extra fields) of /v1/completions and /v1/chat/completions:
    "prompt_compression": {"rate": 0.5, "keep_last_tokens": 32, "unit": "word", "canonicalize": true}
  Every key is optional; a missing one takes the server's setting. rate 1.0 turns compression off for
  the request; canonicalize alone (NFKC, one kind of quotes, collapsed spaces) needs no scorer.

What is compressed:
  - /v1/completions: each prompt (text or token ids); its last keep_last_tokens tokens (the question) are
    kept verbatim, and the cut moves back to a word start so no word is split. Special tokens (BOS) stay.
  - /v1/chat/completions: the content of system and user messages. The last user message keeps its last
    keep_last_tokens tokens (the question); assistant and tool messages are untouched. The chat template's
    special tokens are added after compression, so none is ever dropped.
  usage.prompt_tokens counts the tokens prefilled; usage.prompt_tokens_before_compression the tokens the
  prompt had as sent. An echoed prompt (completions) is the compressed one, the text the model saw.

Scoring grows with the prompt, so it runs in the server's preparation pool (ServerState.run), never on
the event loop: /health and other streams keep answering while a long prompt is scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import lmstack
from lmstack.errors import LmstackError
from lmstack.infer.prompt_compression import canonicalize, compress_ids, starts_word
from lmstack.serve.errors import APIError

UNITS = ("word", "token")


@dataclass
class CompressionConfig:
    model: str | None = None
    """Directory of the small scorer LM (lmstack or HF layout, with a tokenizer.json equal to the served one's);
    none = requests cannot ask for compression (400), though they may still ask for canonicalize."""
    rate: float = 1.0
    """Fraction of a prompt's compressible tokens to keep, in (0, 1], for requests that do not give their own;
    1.0 (the default) = off unless a request opts in."""
    keep_last_tokens: int = 32
    """Tokens at the end of the prompt (or of the last user message) that are never dropped: the question."""
    unit: Literal["word", "token"] = "word"
    """Drop whole words (word) or single tokens (token)."""
    canonicalize: bool = False
    """Canonically reformat every text prompt (NFKC, one kind of quotes, collapsed spaces): raises prefix-cache hits."""

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate <= 1:
            raise ValueError(f"compression.rate={self.rate!r} is not allowed; it must be in (0, 1] (1 = off)")
        if isinstance(self.keep_last_tokens, bool) or not isinstance(self.keep_last_tokens, int) \
                or self.keep_last_tokens < 0:
            raise ValueError(f"compression.keep_last_tokens={self.keep_last_tokens!r} is not allowed; "
                             "it must be an integer >= 0")
        if self.unit not in UNITS:
            raise ValueError(f"compression.unit={self.unit!r} is not allowed; choose one of {', '.join(UNITS)}")
        if self.rate < 1 and self.model is None:
            raise ValueError(f"compression.rate={self.rate} needs a scorer: give compression.model DIR")


@dataclass
class Plan:
    """What one request gets: the resolved rate (1 = no scoring), protected tail, unit and canonicalize."""
    rate: float
    keep_last_tokens: int
    unit: str
    canonicalize: bool


def load_scorer(config: CompressionConfig, tokenizer: Any, device: Any, dtype: Any):
    """The scorer model, after checking that its vocabulary is the served tokenizer's (LmstackError if not).
    A quantized served model (integer weights) gets an fp32 scorer."""
    path = Path(config.model)
    if not (path / "config.json").is_file():
        raise LmstackError(f"compression.model {config.model}: no config.json there; give a model directory")
    if not (path / "tokenizer.json").is_file():
        raise LmstackError(f"compression.model {config.model}: no tokenizer.json there, so its vocabulary cannot be "
                           "checked against the served model's; save the scorer with the served tokenizer")
    theirs, ours = lmstack.load_tokenizer(path).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[0]
        raise LmstackError(f"compression.model {config.model}: its vocabulary does not match the served tokenizer's "
                           f"({len(theirs)} vs {len(ours)} tokens; first difference: {diff[0]!r} at id {diff[1]}); "
                           "the scorer must use the served model's tokenizer")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        dtype = torch.float32
    model = lmstack.load_model(path, dtype=dtype, device=device).eval()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise LmstackError(f"compression.model {config.model}: vocab_size={model.config.vocab_size} has no row for "
                           f"the served tokenizer's ids up to {tokenizer.vocab_size - 1}")
    return model


def plan(state: Any, field: Any) -> Plan | None:
    """The request's `prompt_compression` (or None) + the server's settings -> a Plan, or None when nothing is
    to be done (then the prompt path is exactly the uncompressed one). Cheap: runs on the event loop."""
    cfg: CompressionConfig = state.config.compression
    if field is None and cfg.rate == 1 and not cfg.canonicalize:
        return None
    pick = (lambda name: getattr(cfg, name) if field is None or getattr(field, name) is None
            else getattr(field, name))
    p = Plan(rate=pick("rate"), keep_last_tokens=pick("keep_last_tokens"), unit=pick("unit"),
             canonicalize=pick("canonicalize"))
    if p.rate < 1 and state.scorer is None:
        raise APIError(400, f"prompt_compression.rate={p.rate} asks for compression, but this server has no scorer "
                            "model (start it with --compression.model DIR)", param="prompt_compression.rate")
    return p if p.rate < 1 or p.canonicalize else None


def compress_prompt_ids(state: Any, ids: list[int], p: Plan) -> list[int]:
    """ids with the predictable part dropped: the last keep_last_tokens ids (moved back to a word start
    with unit=word) are kept as they are. Runs in the preparation pool."""
    if p.rate == 1 or len(ids) <= p.keep_last_tokens + 1:
        return ids
    cut = len(ids) - p.keep_last_tokens
    while p.unit == "word" and 0 < cut < len(ids) and not starts_word(state.tokenizer, ids[cut]):
        cut -= 1  # a word split between the dropped head and the kept tail would leave half a word
    kept, _ = compress_ids(state.scorer, state.tokenizer, ids[:cut], p.rate, p.unit)
    return kept + ids[cut:]


def compress_completion_prompts(state: Any, items: list, prompts: list[tuple[str, list[int]]], p: Plan,
                                add_special_tokens: bool) -> tuple[list[tuple[str, list[int]]], int]:
    """/v1/completions' prompts as (text, ids) after canonicalize (text prompts only: token ids are taken as
    given) and compression, and the token count they had before. The text becomes the compressed one (what
    echo returns). Runs in the preparation pool."""
    out, n_before = [], 0
    for item, (text, ids) in zip(items, prompts):
        n_before += len(ids)
        new = ids
        if p.canonicalize and isinstance(item, str):
            new = state.tokenizer.encode(canonicalize(item), add_special_tokens=add_special_tokens)
        new = compress_prompt_ids(state, new, p)
        out.append((text if new == ids else state.tokenizer.decode(new), new))
    return out, n_before


def rewrite_text(state: Any, text: str, p: Plan, protect_tail: bool) -> str:
    """One chat message's content, canonicalized and/or compressed (its tail protected when asked)."""
    if p.canonicalize:
        text = canonicalize(text)
    if p.rate == 1 or not text:
        return text
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    keep = p if protect_tail else Plan(p.rate, 0, p.unit, p.canonicalize)
    out = compress_prompt_ids(state, ids, keep)
    return text if out == ids else state.tokenizer.decode(out)


def rewrite_messages(state: Any, messages: list[dict], p: Plan) -> list[dict]:
    """Chat messages (dicts) with the content of system and user messages rewritten; the last user
    message keeps its last keep_last_tokens tokens."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if m["role"] in ("system", "user") and isinstance(m.get("content"), str):
            m = {**m, "content": rewrite_text(state, m["content"], p, protect_tail=i == last_user)}
        out.append(m)
    return out
