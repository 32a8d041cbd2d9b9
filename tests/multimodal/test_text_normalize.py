"""The TTS text front end (multimodal/text_normalize.py): numbers as the words espeak-ng's `en` voice says, checked
against espeak-ng's own phonemes for every integer 0..9999 (the speech world's NUMBER utterances)."""
import json
import subprocess
import sys

import pytest

from lmstack.multimodal.text_normalize import normalize_text, number_words


@pytest.mark.parametrize("text, spoken", [
    ("4217", "four thousand two hundred and seventeen"),
    ("1005", "one thousand and five"),
    ("300", "three hundred"),
    ("12", "twelve"),
    ("0", "zero"),
    ("40", "forty"),
    ("1100", "one thousand one hundred"),
    ("1950", "nineteen hundred and fifty"),        # espeak-ng reads a plain 19xx like a year
    ("1,950", "one thousand nine hundred and fifty"),  # ... but not with a thousands separator
    ("12345", "twelve thousand three hundred and forty five"),
    ("1905000", "one million nine hundred and five thousand"),
    ("007", "zero zero seven"),
    ("room 12, -3.5", "room twelve, minus three point five"),
    ("x1950y", "x nineteen hundred and fifty y"),
])
def test_normalize_text_says_numbers_as_espeak_does(text, spoken):
    assert normalize_text(text) == spoken


def test_normalize_text_leaves_other_text_alone():
    for text in ("Ada was born in Amberhaven.", "a , b", "", "  spaced  out  "):
        assert normalize_text(text) == text
    assert normalize_text("Ada is 37.") == "Ada is thirty seven."
    assert normalize_text("1234567890123") == "one two three four five six seven eight nine zero one two three"
    with pytest.raises(ValueError, match="10\\*\\*12"):
        number_words(10 ** 12)
    assert number_words(1950, year_style=False) == "one thousand nine hundred and fifty"


_PHONEMES = r"""
import ctypes, json, sys
import espeakng_loader
lib = ctypes.CDLL(espeakng_loader.get_library_path())
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
assert lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0) > 0
assert lib.espeak_SetVoiceByName(b"en") == 0
lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
out = []
for text in json.load(sys.stdin):
    buf, parts = ctypes.c_char_p(text.encode()), []
    while buf.value:
        parts.append(lib.espeak_TextToPhonemes(ctypes.byref(buf), 1, 0).decode())
    out.append(" ".join(parts))
print(json.dumps(out))
"""


def _canonical(phonemes: str) -> str:
    """espeak-ng's phonemes without stress, pauses and spaces; a written-out "and"/"forty"/"eleven" gets the
    vowel spelling espeak-ng uses inside a number (the same sounds, other symbols)."""
    p = phonemes.replace("_!", "").replace("_:", "").replace("'", "").replace(",", "").replace(";", "")
    p = " ".join("@n" if w == "and" else w for w in p.split(" "))
    return p.replace("O@", "o@").replace("I2", "I").replace(" ", "")


def test_every_number_of_the_speech_world_sounds_as_espeak_says_it():
    pytest.importorskip("espeakng_loader")
    texts = [str(n) for n in range(10000)]
    spoken = [normalize_text(t) for t in texts]
    # espeak-ng keeps global state, so it runs in a child process of its own
    run = subprocess.run([sys.executable, "-c", _PHONEMES], input=json.dumps(texts + spoken), capture_output=True,
                         text=True, timeout=120)
    if run.returncode:
        pytest.skip(f"espeak-ng did not run: {run.stderr[-300:]}")
    phon = json.loads(run.stdout)
    digits, words = phon[: len(texts)], phon[len(texts):]
    bad = [(t, s, d, w) for t, s, d, w in zip(texts, spoken, digits, words) if _canonical(d) != _canonical(w)]
    assert not bad, f"{len(bad)} numbers differ, e.g. {bad[:3]}"
    assert _canonical(digits[4217]) != _canonical(digits[4271])  # the comparison can fail
