"""Long documents with a hidden passkey, for long-context retrieval tests.

A haystack of filler sentences is built up to a target length (in words or characters), and the
needle sentence "The pass key is 48213. Remember it. 48213 is the pass key." is inserted at a
sentence boundary at the requested relative depth (0.0 = start, 1.0 = end). The record says where
the needle landed (`char_offset`, `depth`) and carries the question and the answer.
The filler is either world sentences (varied, full of other numbers that act as distractors) or
short repeated lines (the classic setup). The passkey never appears anywhere else in the text.

Usage:
    import random
    from lmstack.world import World
    from lmstack.world.passkey import make_passkey_document
    world = World(seed=0, n_people=20)
    rec = make_passkey_document(random.Random(0), length=2000, unit="words", position=0.25, world=world)
    rec["text"][rec["char_offset"]:].startswith(rec["needle"])   # True
    rec["answer"]                                                # e.g. "48213"
"""
from __future__ import annotations

import random
from typing import Iterator

from lmstack.world.bios import describe_city, paraphrase_bio
from lmstack.world.config import assign_split, sub_rng
from lmstack.errors import LmstackError

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
REPEAT_FILLER = ("The hills are quiet.", "The river is slow.", "The lamps are lit.", "We walk on.",
                 "The road goes on and on.")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _measure(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


def _filler_sentences(rng: random.Random, filler: str, world):
    """An endless stream of filler sentences."""
    if filler == "repeat":
        while True:
            yield from REPEAT_FILLER
    if world is None:
        raise LmstackError("passkey filler 'world' needs a world; pass world= or use filler='repeat'")
    while True:
        if rng.random() < 0.7:
            text = paraphrase_bio(rng.choice(world.people), rng, world)
        else:
            text = describe_city(rng.choice(world.cities), rng)
        yield from text.split(". ")  # one sentence at a time, so the needle lands between sentences


def make_passkey_document(rng: random.Random, length: int = 1024, unit: str = "words", position: float = 0.5,
                          filler: str = "world", world=None, key: int | None = None) -> dict:
    """A document of about `length` words/chars with the passkey needle at relative `position`.

    Fields: text, question, answer, passkey, needle, position (requested), depth (actual fraction of
    the haystack's characters that come before the needle), char_offset, length, unit, n_words, n_chars, filler.
    """
    if unit not in ("words", "chars"):
        raise LmstackError(f"unit={unit!r} is not allowed; choose 'words' or 'chars'")
    if not 0.0 <= position <= 1.0:
        raise LmstackError(f"position must be in [0, 1], got {position!r}")
    key = rng.randint(10000, 99999) if key is None else key
    needle = NEEDLE.format(key=key)
    budget = length - _measure(needle, unit)
    if budget < 0:
        raise LmstackError(f"length={length} {unit} is too short to hold the needle ({_measure(needle, unit)} {unit})")
    sentences: list[str] = []
    size = 0
    stream = _filler_sentences(rng, filler, world)
    while size < budget:
        s = next(stream).strip()
        if not s:
            continue
        s = s if s.endswith((".", "!", "?")) else s + "."
        if str(key) in s:  # the key must be findable in exactly one place
            continue
        sentences.append(s)
        size += _measure(s, unit) + (1 if unit == "chars" else 0)
    # Drop the last sentence if it overshoots more than it undershoots.
    if sentences and size - budget > _measure(sentences[-1], unit) / 2:
        sentences.pop()
    # Insert at the sentence boundary nearest to the requested fraction of the haystack.
    boundaries = [0]  # characters before sentence i, for i = 0..len(sentences)
    for s in sentences:
        boundaries.append(boundaries[-1] + len(s) + 1)
    target = position * boundaries[-1]
    cut = min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - target))
    parts = sentences[:cut] + [needle] + sentences[cut:]
    text = " ".join(parts)
    offset = len(" ".join(sentences[:cut])) + (1 if cut else 0)
    return {"text": text, "question": QUESTION, "answer": str(key), "passkey": key, "needle": needle,
            "position": position, "depth": round(offset / max(1, len(text) - len(needle)), 4), "char_offset": offset,
            "length": length, "unit": unit, "n_words": len(text.split()), "n_chars": len(text), "filler": filler}


def build_passkey(world) -> Iterator[dict]:
    """Yield n_passkey documents over a grid of lengths (cfg.passkey_lengths) x depths (DEPTHS)."""
    cfg = world.config
    rng, split_rng = sub_rng(world.seed, "passkey"), sub_rng(world.seed, "passkey-split")
    lengths = cfg.passkey_lengths
    for n in range(cfg.count("n_passkey")):
        length = lengths[n % len(lengths)]
        depth = DEPTHS[(n // len(lengths)) % len(DEPTHS)]
        rec = make_passkey_document(rng, length, cfg.passkey_unit, depth, cfg.passkey_filler, world)
        yield {"id": f"passkey/{n}", "source": "world/passkey", "split": assign_split(split_rng, cfg.split_fractions),
               "kind": "passkey", **rec}
