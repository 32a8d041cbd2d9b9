"""Labelled good/bad documents for the quality classifier and its self-training (issue 4, 1b).

Half the records are good world text (bios, city descriptions, stories, dialogues, worked
arithmetic); half are bad text of six kinds:
- `gibberish`: strings of random letters;
- `word_salad`: a good document with its words shuffled (same vocabulary, no syntax: only a
  classifier that sees word order catches it);
- `repetition`: one line or sentence repeated over and over;
- `boilerplate`: lorem ipsum, template markers in curly brackets, cookie and subscribe banners;
- `symbols`: runs of symbols with a few words in between;
- `spam`: keyword stuffing and calls to action.
`label` is the ground truth ("good"/"bad"). `labelled` says whether a trainer may see the label:
only `quality_labelled_fraction` (default 20%) of the train split is labelled; the rest is the unlabelled pool
that self-training pseudo-labels. Val and test are fully labelled for measuring precision/recall.

Usage:
    from lmstack.world import World
    recs = World(seed=0, n_people=30).corpus("quality")
    seed_set = [r for r in recs if r["split"] == "train" and r["labelled"]]
    pool = [r for r in recs if r["split"] == "train" and not r["labelled"]]
"""
from __future__ import annotations

import random
from typing import Iterator

from lmstack.world import lexicon as lx
from lmstack.world.arithmetic import build_arithmetic, make_problem
from lmstack.world.bios import describe_city, paraphrase_bio
from lmstack.world.config import assign_split, sub_rng
from lmstack.world.stories import make_dialogue, make_story

_LOREM = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
          "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua")
_BANNERS = ("Accept all cookies to continue.", "Subscribe to our newsletter!", "Click here to read more.",
            "All rights reserved.", "Page 1 of 12 | Next >>", "Share on social media.", "{{ page.title }}",
            "{% include footer.html %}", "var x = {a: 1, b: [2, 3]};")
_SPAM = ("buy now", "best price", "cheap {w}", "free {w}", "limited offer", "click here", "100% guaranteed",
         "act fast", "discount {w}", "win a {w}")
_SYMBOLS = "#$%&*@^~|<>+=/\\[]{}"


def good_document(world, rng: random.Random, problems: list[dict] | None = None) -> tuple[str, str]:
    """(kind, text) of a well-formed world document. Arithmetic is drawn from `problems` when given
    (the train split of the arithmetic corpus, so no held-out problem leaks in here)."""
    kind = rng.choice(("bio", "city", "story", "dialogue", "arithmetic"))
    if kind == "bio":
        return kind, paraphrase_bio(rng.choice(world.people), rng, world)
    if kind == "city":
        return kind, describe_city(rng.choice(world.cities), rng)
    if kind == "story":
        return kind, make_story(world, rng)
    if kind == "dialogue":
        return kind, make_dialogue(world, rng)
    prob = rng.choice(problems) if problems else make_problem(world, rng, rng.randint(1, 4))
    return kind, prob["question"] + "\n" + prob["solution"]


def _gibberish(rng, world, problems=None):
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxzaeiou") for _ in range(rng.randint(2, 11)))
             for _ in range(rng.randint(30, 90))]
    return " ".join(words)


def _word_salad(rng, world, problems=None):
    words = good_document(world, rng, problems)[1].split()
    rng.shuffle(words)
    return " ".join(words)


def _repetition(rng, world, problems=None):
    line = rng.choice(good_document(world, rng, problems)[1].split("\n")[0].split(". ")).strip(".") + "."
    return "\n".join([line] * rng.randint(6, 20))


def _boilerplate(rng, world, problems=None):
    lorem = " ".join(rng.choice(_LOREM) for _ in range(rng.randint(20, 50)))
    banners = rng.sample(_BANNERS, rng.randint(3, 6))
    parts = banners + [lorem.capitalize() + "."]
    rng.shuffle(parts)
    return "\n".join(parts)


def _symbols(rng, world, problems=None):
    out = []
    for _ in range(rng.randint(20, 50)):
        if rng.random() < 0.3:
            out.append(rng.choice(lx.PLAIN_WORDS))
        else:
            out.append("".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(2, 8))))
    return " ".join(out)


def _spam(rng, world, problems=None):
    word = rng.choice(lx.PLAIN_WORDS) + "s"
    phrases = [rng.choice(_SPAM).format(w=word) for _ in range(rng.randint(12, 30))]
    return " ".join(p.upper() if rng.random() < 0.3 else p for p in phrases) + "!!!"


BAD_KINDS = {"gibberish": _gibberish, "word_salad": _word_salad, "repetition": _repetition,
             "boilerplate": _boilerplate, "symbols": _symbols, "spam": _spam}


def build_quality(world) -> Iterator[dict]:
    """Yield n_quality records, alternating good and bad (bad kinds in rotation)."""

    cfg = world.config
    rng, split_rng = sub_rng(world.seed, "quality"), sub_rng(world.seed, "quality-split")
    problems = [p for p in build_arithmetic(world) if p["split"] == "train"]
    bad_names = list(BAD_KINDS)
    for n in range(cfg.count("n_quality")):
        if n % 2 == 0:
            kind, text = good_document(world, rng, problems)
            label = "good"
        else:
            kind = bad_names[(n // 2) % len(bad_names)]
            text, label = BAD_KINDS[kind](rng, world, problems), "bad"
        split = assign_split(split_rng, cfg.split_fractions)
        labelled = split != "train" or rng.random() < cfg.quality_labelled_fraction
        yield {"id": f"quality/{n}", "source": "world/quality", "split": split, "kind": "quality", "text": text,
               "label": label, "quality_kind": kind, "labelled": labelled}
