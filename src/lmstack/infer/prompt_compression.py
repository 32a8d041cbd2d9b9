"""Prompt optimisation before prefill: LLMLingua-style compression and canonical reformatting.

Compression (Selective Context, Li et al. 2023; LLMLingua, Jiang et al. 2023): a small LM scores each
token's self-information I(x_t) = -log p(x_t | x_<t). Tokens the LM finds predictable carry little
information, so dropping them shortens the prompt (and the prefill, i.e. time to first token) while
keeping what the target model needs. We score with one forward pass of the small LM, add the scores
of a word's tokens (dropping half a word would leave garbage), and keep the most informative words
until `rate` of the tokens remain. A protected tail (the question) and special tokens are never dropped.

Canonical reformatting makes equivalent prompts identical text: Unicode NFKC, one kind of quotes and
dashes, runs of spaces and blank lines collapsed, trailing spaces removed. Identical text means
identical tokens, so it also raises prefix-cache hits.

Usage:
    text = canonicalize("  “Hello”\\u00a0 world —  ok  ")          # '"Hello" world - ok'
    ids, kept = compress_ids(scorer_model, tok, tok.encode(context), rate=0.5)
    short = compress_text(scorer_model, tok, context, rate=0.5, keep_suffix="\\nQuestion: ...")

The server applies it per request (lmstack.serve.prompt_compression: `lmstack serve --compression.model DIR`,
then `"prompt_compression": {"rate": 0.5}` in a completions or chat request).
"""
from __future__ import annotations

import re
import unicodedata

import torch

from lmstack.errors import LmstackError

_QUOTES = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"',
           "\u201e": '"', "\u00ab": '"', "\u00bb": '"', "\u2013": "-", "\u2014": "-", "\u2212": "-",
           "\u2026": "...", "\u00a0": " ", "\u200b": ""}


def canonicalize(text: str) -> str:
    """Equivalent prompts -> identical text (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_QUOTES.get(c, c) for c in text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = re.sub(r"[ ]{2,}", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@torch.no_grad()
def self_information(model, ids: list[int]) -> torch.Tensor:
    """-log p(x_t | x_<t) for every token (the first token, having no context, gets +inf: always kept).

    A prompt longer than the scorer's max_seq_len is scored in windows of max_seq_len that overlap by
    half, so every later token still sees at least half a window of context."""
    if not ids:
        return torch.zeros(0)
    window = getattr(getattr(model, "config", None), "max_seq_len", None) or len(ids)
    window = max(2, window)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    parts, pos = [torch.tensor([float("inf")])], 1  # pos: the next token to score
    while pos < len(ids):
        lo = max(0, pos - window // 2)
        hi = min(len(ids), lo + window)
        logp = model(x[:, lo:hi])[0, pos - 1 - lo:hi - 1 - lo].float().log_softmax(-1)
        parts.append(-logp.gather(-1, x[0, pos:hi, None])[:, 0].cpu())
        pos = hi
    return torch.cat(parts)


def starts_word(tok, token_id: int) -> bool:
    """Whether a token begins a new word: its text starts with a space, a newline or punctuation
    (byte-level BPE marks a leading space on the token itself)."""
    piece = tok.decode([token_id])
    return not piece or piece[0] in " \n\t.,;:!?()\"'"


def _words(tok, ids: list[int]) -> list[list[int]]:
    """Group token positions into words (see starts_word)."""
    groups: list[list[int]] = []
    for i, t in enumerate(ids):
        if not groups or starts_word(tok, t):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def compress_ids(model, tok, ids: list[int], rate: float = 0.5, unit: str = "word") -> tuple[list[int], list[bool]]:
    """Keep the most informative ~rate of the tokens; returns (kept ids, keep mask). unit: 'word' or 'token'."""
    if not 0 < rate <= 1:
        raise LmstackError(f"rate must be in (0, 1], got {rate}")
    if unit not in ("word", "token"):
        raise LmstackError(f"unit must be 'word' or 'token', got {unit!r}")
    if rate == 1 or len(ids) < 2:
        return list(ids), [True] * len(ids)
    info = self_information(model, ids)
    specials = tok.special_ids if tok is not None else set()
    groups = _words(tok, ids) if unit == "word" and tok is not None else [[i] for i in range(len(ids))]
    # a word's information is the sum over its tokens (the cost of spelling it out)
    scored = sorted(range(len(groups)), key=lambda g: -float(sum(info[i] for i in groups[g])))
    budget = max(1, round(rate * len(ids)))
    keep = [False] * len(ids)
    kept = 0
    for g in scored:
        if kept >= budget:
            break
        for i in groups[g]:
            keep[i] = True
        kept += len(groups[g])
    for i, t in enumerate(ids):
        if t in specials:
            keep[i] = True
    return [t for t, k in zip(ids, keep) if k], keep


def compress_text(model, tok, text: str, rate: float = 0.5, keep_prefix: str = "", keep_suffix: str = "",
                  unit: str = "word") -> str:
    """Compress `text`; keep_prefix / keep_suffix (instructions, the question) are put around it verbatim."""
    ids = tok.encode(text)
    out, _ = compress_ids(model, tok, ids, rate, unit)
    return keep_prefix + tok.decode(out) + keep_suffix
