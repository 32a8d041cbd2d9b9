"""Incremental detokenization and stop-string matching for streaming output.

Decoding the whole output again after every token costs O(n^2). Instead each sequence keeps two
offsets into its output tokens: text is decoded from a short window (detok_offset..end) and the part
already emitted (detok_offset..read_offset) is subtracted, so BPE merges and multi-byte characters that
span tokens come out right. A window ending in U+FFFD (half a UTF-8 character) waits for more tokens.

Stop strings are compiled once per request (StopStrings) and each new piece of text is scanned in time
proportional to its length plus the held-back tail, not to the total size of the stop list: a match
must end inside the new text, so only end positions there are tried, each against only the distinct
stop lengths that end in that character (one set lookup per length). The first match to END wins
(among those, the longest): the same cut a character-by-character stream would make, so the result
does not depend on how the text was split into tokens. The held-back tail (the longest suffix of the
text that starts some stop string) is found by binary search in the sorted stops, starting from the
previous tail: a stop string split across several tokens is still found, and a client never sees
text that is later cut.

Usage:
    new_text = detokenize_step(tok, seq, skip_special_tokens=True)
    stops = StopStrings(["\\n\\n", "User:"])
    hit, hold = stops.scan(seq.text, old_len, old_hold)   # hit: (cut_position_without_stop, stop) or None
"""
from __future__ import annotations

from bisect import bisect_left

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


class StopStrings:
    """A request's stop strings, indexed for scans linear in the new text."""

    def __init__(self, stops: list[str]):
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self.sorted = sorted(self.stops)
        self.firsts = {s[0] for s in self.stops}
        self.by_len: dict[int, set[str]] = {}
        ends: dict[str, set[int]] = {}
        for s in self.stops:
            self.by_len.setdefault(len(s), set()).add(s)
            ends.setdefault(s[-1], set()).add(len(s))
        self.lengths_ending_in = {c: sorted(ls, reverse=True) for c, ls in ends.items()}  # longest first

    def scan(self, text: str, old_len: int, old_hold: int = 0) -> tuple[tuple[int, str] | None, int]:
        """text[:old_len] was scanned before and ended with old_hold held-back characters.

        Returns (hit, hold): hit = (start of the first stop to end in text[old_len:], that stop) or None;
        hold = characters at the end of text that could still begin a stop string (0 after a hit)."""
        for e in range(max(old_len, 0) + 1, len(text) + 1):
            for n in self.lengths_ending_in.get(text[e - 1], ()):
                if n <= e and text[e - n:e] in self.by_len[n]:
                    return (e - n, text[e - n:e]), 0
        for j in range(max(0, old_len - old_hold), len(text)):  # the new tail starts in the old one or later
            if text[j] in self.firsts:
                tail = text[j:]
                i = bisect_left(self.sorted, tail)
                if i < len(self.sorted) and self.sorted[i].startswith(tail):
                    return None, len(tail)
        return None, 0


def find_stop(text: str, new_from: int, stops: list[str], include: bool) -> tuple[int, str] | None:
    """First stop string that ends in text[new_from:]; returns (where to cut the text, the stop)."""
    hit, _ = StopStrings(stops).scan(text, new_from, max(0, new_from))
    if hit is None:
        return None
    idx, s = hit
    return (idx + len(s) if include else idx), s


def held_back(text: str, stops: list[str] | None) -> int:
    """Characters at the end of text that could be the start of a stop string (not streamed yet)."""
    if not stops:
        return 0
    return StopStrings(stops).scan(text, len(text), len(text))[1]
