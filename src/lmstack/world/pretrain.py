"""The pretraining corpus: bios, city and country descriptions, worked arithmetic, stories, dialogues.

Splits:
- train: `bios_per_person` bio paraphrases of *every* person (the facts QA tests ask about),
  two descriptions of every city and country, the solutions of train-split arithmetic problems,
  train stories and dialogues and, when `mix_qa_in_pretrain`, the train-split QA pairs.
- val / test: one fresh bio paraphrase for a tenth of the people each, one more description per
  place, val/test arithmetic, stories and dialogues: held-out *text* for measuring LM loss.
  They contain no QA pairs.
Kinds: bio, city, country, arithmetic, story, dialogue, qa.

Usage:
    from lmstack.world import World
    docs = World(seed=0, n_people=20).corpus("pretrain", split="train")
    {d["kind"] for d in docs}     # {'bio', 'city', 'country', 'arithmetic', 'story', 'dialogue', 'qa'}
"""
from __future__ import annotations

from typing import Iterator

from lmstack.world.arithmetic import build_arithmetic
from lmstack.world.bios import describe_city, describe_country, paraphrase_bio
from lmstack.world.config import assign_split, sub_rng
from lmstack.world.qa import build_qa
from lmstack.world.stories import make_dialogue, make_story


def build_pretrain(world) -> Iterator[dict]:
    """Yield every pretraining document (fields: text, id, source, split, kind, and a subject)."""

    cfg = world.config
    rng = sub_rng(world.seed, "pretrain")
    split_rng = sub_rng(world.seed, "pretrain-split")
    n = 0

    def doc(split, kind, text, **meta):
        nonlocal n
        n += 1
        return {"id": f"pretrain/{n - 1}", "source": "world/pretrain", "split": split, "kind": kind, "text": text,
                **meta}

    per_person = cfg.count("bios_per_person")
    for person in world.people:
        for _ in range(per_person):
            yield doc("train", "bio", paraphrase_bio(person, rng, world), subject=person.name)
        u = rng.random()  # a tenth of the people get one extra bio in val, another tenth in test
        if u < 0.2:
            yield doc("val" if u < 0.1 else "test", "bio", paraphrase_bio(person, rng, world), subject=person.name)
    for city in world.cities:
        for split in ("train", "train", "val" if split_rng.random() < 0.5 else "test"):
            yield doc(split, "city", describe_city(city, rng, n_sentences=rng.randint(4, 7)), subject=city.name)
    for country in world.countries:
        for split in ("train", "train", "val" if split_rng.random() < 0.5 else "test"):
            yield doc(split, "country", describe_country(country, rng, n_sentences=rng.randint(3, 5)),
                      subject=country.name)
    for prob in build_arithmetic(world):  # worked solutions, in the problem's own split
        yield doc(prob["split"], "arithmetic", prob["text"], difficulty=prob["difficulty"])
    for _ in range(cfg.count("n_stories")):
        yield doc(assign_split(split_rng, cfg.split_fractions), "story", make_story(world, rng))
    for _ in range(cfg.count("n_dialogues")):
        yield doc(assign_split(split_rng, cfg.split_fractions), "dialogue", make_dialogue(world, rng))
    if cfg.mix_qa_in_pretrain:
        for q in build_qa(world):
            if q["split"] == "train":
                yield doc("train", "qa", q["text"], subject=q["person"], attribute=q["attribute"])
