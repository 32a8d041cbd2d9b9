"""Incremental detokenization and stop-string matching for streaming output.

Decoding the whole output again after every token costs O(n^2). Instead each sequence keeps two
offsets into its output tokens: text is decoded from a short window (detok_offset..end) and the part
already emitted (detok_offset..read_offset) is subtracted, so BPE merges and multi-byte characters that
span tokens come out right. A window ending in U+FFFD (half a UTF-8 character) waits for more tokens.

Stop strings are searched only in the region new text could complete, so a stop string split across
several tokens is still found; the text is cut there (keeping the stop string if asked).

Usage:
    new_text = detokenize_step(tok, seq, skip_special_tokens=True)
    hit = find_stop(seq.text, start, ["\\n\\n"], include=False)   # (cut_position, stop) or None
"""
from __future__ import annotations

from lmstack.infer.sequence import Sequence

def detokenize_step(tokenizer, seq: Sequence, skip_special_tokens: bool = True) -> str:
    """Decode what the newest output tokens add to the text; updates the sequence's offsets."""
    out = seq.output_ids
    prefix_text = tokenizer.decode(out[seq.detok_offset:seq.read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(out[seq.detok_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) <= len(prefix_text) or full.endswith("\ufffd"):
        return ""  # nothing visible yet, or half a character: wait for the next token
    seq.detok_offset, seq.read_offset = seq.read_offset, len(out)
    return full[len(prefix_text):]


def find_stop(text: str, new_from: int, stops: list[str], include: bool) -> tuple[int, str] | None:
    """First stop string that ends in text[new_from:]; returns (where to cut the text, the stop)."""
    best = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    if best is None:
        return None
    idx, s = best
    return (idx + len(s) if include else idx), s


def held_back(text: str, stops: list[str] | None) -> int:
    """Characters at the end of text that could be the start of a stop string (not streamed yet)."""
    if not stops:
        return 0
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
