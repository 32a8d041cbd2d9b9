"""Text normalisation for TTS: numbers written in digits -> the English words espeak-ng's `en` voice says (row XII.8).

A TTS that reads characters must otherwise learn number verbalisation (place value: "4217" is "four thousand two
hundred and seventeen") from its training pairs; real TTS systems put a normalisation front end before the
acoustic model instead. This one follows what espeak-ng (the voice behind the speech world) says, checked
against espeak-ng's own phonemes for every integer 0..9999 (tests/multimodal/test_text_normalize.py):
- British "and" before the last part below 100: 4217 -> "four thousand two hundred and seventeen",
  1005 -> "one thousand and five", 300 -> "three hundred", 12 -> "twelve", 0 -> "zero";
- a plain four-digit 1900..1999 is said like a year: 1950 -> "nineteen hundred and fifty" (but "1,950" ->
  "one thousand nine hundred and fifty", as espeak-ng does);
- thousands separators ("12,345"), scales up to billions, a minus sign before a number ("-5" -> "minus five"),
  decimals digit by digit after "point" ("3.14" -> "three point one four"), and a digit string with a leading
  zero ("007") or longer than 12 digits read digit by digit.
Everything else in the text is left as it is (a space is put between a number and a letter next to it).

Usage:
    from lmstack.multimodal.text_normalize import normalize_text, number_words
    normalize_text("4217")            # 'four thousand two hundred and seventeen'
    normalize_text("room 12, -3.5")   # 'room twelve, minus three point five'
    number_words(1950)                # 'nineteen hundred and fifty'
"""
from __future__ import annotations

import re

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = ((10 ** 9, "billion"), (10 ** 6, "million"), (10 ** 3, "thousand"))
MAX_DIGITS = 12
"""Longer integers are read digit by digit."""

_NUMBER = re.compile(r"(?<![\d.,])(-)?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\d])")


def _below_100(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f" {ONES[ones]}" if ones else "")


def _below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_100(rest)
    head = f"{ONES[hundreds]} hundred"
    return head + (f" and {_below_100(rest)}" if rest else "")


def number_words(n: int, year_style: bool = True) -> str:
    """The words for an integer 0 <= n < 10**12; `year_style`: 1900..1999 as "nineteen hundred ..."."""
    if not 0 <= n < 10 ** MAX_DIGITS:
        raise ValueError(f"number_words speaks 0 <= n < 10**{MAX_DIGITS}, got {n}")
    if n == 0:
        return "zero"
    if year_style and 1900 <= n <= 1999:
        return "nineteen hundred" + (f" and {_below_100(n - 1900)}" if n > 1900 else "")
    parts = []
    for value, name in SCALES:
        group, n = divmod(n, value)
        if group:
            parts.append(f"{_below_1000(group)} {name}")
    if n:
        parts.append(("and " if parts and n < 100 else "") + _below_1000(n))
    return " ".join(parts)


def _digits(s: str) -> str:
    return " ".join(ONES[int(d)] for d in s)


def _speak(match: re.Match) -> str:
    minus, whole, frac = match.group(1), match.group(2), match.group(3)
    plain = whole.replace(",", "")
    if (len(plain) > 1 and plain[0] == "0" and "," not in whole) or len(plain) > MAX_DIGITS:
        words = _digits(plain)
    else:
        words = number_words(int(plain), year_style="," not in whole and len(plain) == 4)
    if frac:
        words += f" point {_digits(frac)}"
    return ("minus " if minus else "") + words


def _pad(match: re.Match) -> str:
    """The spoken number, with a space against a letter right before or after it (as in "x1950y")."""
    text, start, end = match.string, match.start(), match.end()
    before = " " if start and text[start - 1].isalpha() else ""
    after = " " if end < len(text) and text[end].isalpha() else ""
    return before + _speak(match) + after


def normalize_text(text: str) -> str:
    """`text` with every number written in digits replaced by its spoken English words (see the module doc)."""
    return _NUMBER.sub(_pad, text)


__all__ = ["normalize_text", "number_words"]
