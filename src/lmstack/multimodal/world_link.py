"""The link between the shapes world and the text world: every city gets a flag, every person a badge.

A flag or a badge is a shapes-world Scene drawn from the entity's name alone, so a picture is as
deterministic as the fact table it joins. The pictures carry facts no text states (which shape is on the
flag of Amberhaven), and the text world carries facts no picture shows (Amberhaven's population), so the
questions built here need both worlds:

- image-only questions: "What shape is the emblem on the flag of Amberhaven?" (the answer is only in the
  stored picture; the city's name has to find it first -- multimodal RAG, mm_rag.py);
- joins the other way: "<image> Which city has this flag?" and "<image> What is the population of the city
  whose flag this is?" (the picture finds the city, the text world answers).

Layout. A flag is a large emblem left of centre and a small mark in the upper right corner on a plain
background; a badge is two medium shapes side by side on a striped background. Every (emblem shape, emblem
colour, mark shape, mark colour) design is drawn without replacement from all designs in which the two
shapes and the two colours differ (1,680 of them), so no two cities share a flag and no two people a badge
while the world has at most that many of each. `variant=k > 0` redraws the same design with the shapes moved
by a few pixels and a noisy background (the "photo" of a flag a user shows), so an image query is never
byte-equal to the stored picture.

Usage:
    from lmstack.world import World
    from lmstack.multimodal.world_link import build_world_link, flag_scene, link_questions
    world = World(seed=0, size="small")
    records = build_world_link(world, size=64)          # one flag per city, one badge per person
    rec = records[0]; rec["entity"], rec["caption"], rec["scene"]
    questions = link_questions(world, records)        # flag_shape, flag_colour, which_city, city_fact, ...
    photo = flag_scene(world, "Amberhaven", size=64, variant=1)   # the same flag, moved and noisy
"""
from __future__ import annotations

import itertools

from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import COLOURS, SHAPES, Obj, Scene, check_side
from lmstack.world.config import sub_rng

KINDS = ("flag", "badge")
FLAG_BACKGROUNDS = ("white", "gray", "black")
CITY_FACTS = ("country", "population", "river", "landmark")
PERSON_FACTS = ("birth_city", "employer", "profession")
QUESTION_TYPES = ("flag_shape", "flag_colour", "which_city", "city_fact", "badge_shape", "who_badge", "person_fact")
JITTER = 3  # pixels a variant may move each shape; far below a shape's radius, so the design stays readable


def designs() -> list[tuple[str, str, str, str]]:
    """Every (emblem shape, emblem colour, mark shape, mark colour) with two shapes and two colours that differ."""
    return [(s1, c1, s2, c2) for s1, c1, s2, c2 in itertools.product(SHAPES, COLOURS, SHAPES, COLOURS)
            if s1 != s2 and c1 != c2]


def _names(world, kind: str) -> list[str]:
    return [c.name for c in world.cities] if kind == "flag" else [p.name for p in world.people]


def _design_table(world, kind: str) -> dict[str, tuple[str, str, str, str]]:
    """name -> design, drawn without replacement from one shuffled list per (world seed, kind)."""
    names = _names(world, kind)
    pool = designs()
    if len(names) > len(pool):
        raise LmstackError(f"the world has {len(names)} {'cities' if kind == 'flag' else 'people'}, more than the "
                           f"{len(pool)} distinct {kind} designs; use a smaller world")
    sub_rng(world.seed, "world_link", kind).shuffle(pool)
    return dict(zip(names, pool))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LmstackError(f"unknown picture kind {kind!r}; allowed: {', '.join(KINDS)}")


def design_of(world, name: str, kind: str = "flag") -> tuple[str, str, str, str]:
    """The (emblem shape, emblem colour, mark shape, mark colour) of `name`'s flag or badge."""
    _check_kind(kind)
    table = _design_table(world, kind)
    if name not in table:
        raise LmstackError(f"no {'city' if kind == 'flag' else 'person'} named {name!r} in the world "
                           f"(seed={world.seed})")
    return table[name]


def _layout(design: tuple[str, str, str, str], kind: str, size: int, rng, variant: int) -> tuple[Obj, Obj]:
    s1, c1, s2, c2 = design
    if kind == "flag":
        (r1, x1, y1), (r2, x2, y2) = (round(0.22 * size), 0.40, 0.55), (round(0.10 * size), 0.80, 0.20)
        sizes = ("large", "small")
    else:
        (r1, x1, y1), (r2, x2, y2) = (round(0.16 * size), 0.28, 0.5), (round(0.16 * size), 0.72, 0.5)
        sizes = ("large", "large")
    dx = [rng.randint(-JITTER, JITTER) if variant else 0 for _ in range(4)]
    return (Obj(s1, c1, sizes[0], round(x1 * size) + dx[0], round(y1 * size) + dx[1], r1),
            Obj(s2, c2, sizes[1], round(x2 * size) + dx[2], round(y2 * size) + dx[3], r2))


def picture_scene(world, name: str, kind: str = "flag", size: int = 64, variant: int = 0) -> Scene:
    """The Scene of `name`'s flag (a city) or badge (a person); variant > 0: moved shapes, noisy background."""
    check_side(size)
    if not isinstance(variant, int) or variant < 0:
        raise LmstackError(f"variant must be an integer >= 0, got {variant!r}")
    design = design_of(world, name, kind)
    rng = sub_rng(world.seed, "world_link", kind, name, variant)
    background = FLAG_BACKGROUNDS[sum(map(ord, name)) % len(FLAG_BACKGROUNDS)]
    objects = _layout(design, kind, size, rng, variant)
    texture = "noise" if variant else ("plain" if kind == "flag" else "stripes")
    return Scene(size, background, texture, rng.randrange(2 ** 31), objects)


def flag_scene(world, city: str, size: int = 64, variant: int = 0) -> Scene:
    """The flag of `city` (see picture_scene)."""
    return picture_scene(world, city, "flag", size, variant)


def badge_scene(world, person: str, size: int = 64, variant: int = 0) -> Scene:
    """The badge of `person` (see picture_scene)."""
    return picture_scene(world, person, "badge", size, variant)


def describe(design: tuple[str, str, str, str], kind: str) -> str:
    s1, c1, s2, c2 = design
    if kind == "flag":
        return f"a large {c1} {s1} with a small {c2} {s2} in the corner"
    return f"a {c1} {s1} beside a {c2} {s2}"


def build_world_link(world, size: int = 64, kinds: tuple[str, ...] = KINDS, max_people: int | None = None
                     ) -> list[dict]:
    """One record per city (a flag) and per person (a badge, the first `max_people` only when given).

    A record: id, kind, entity, scene (Scene.to_dict()), design {emblem_shape, emblem_colour, mark_shape,
    mark_colour}, caption, facts (the text world's facts about the entity, as strings)."""
    for k in kinds:
        _check_kind(k)
    records = []
    for kind in kinds:
        names = _names(world, kind)
        if kind == "badge" and max_people is not None:
            names = names[:max_people]
        table = _design_table(world, kind)
        attrs = CITY_FACTS if kind == "flag" else PERSON_FACTS
        for name in names:
            design = table[name]
            scene = picture_scene(world, name, kind, size)
            owner = "the flag of" if kind == "flag" else "the badge of"
            records.append({
                "id": f"{kind}-{name.replace(' ', '_')}", "kind": kind, "entity": name, "scene": scene.to_dict(),
                "design": dict(zip(("emblem_shape", "emblem_colour", "mark_shape", "mark_colour"), design)),
                "caption": f"{owner[0].upper()}{owner[1:]} {name}: {describe(design, kind)}.",
                "facts": {a: str(world.fact(name, a)) for a in attrs}})
    return records


def link_questions(world, records: list[dict], seed: int = 0) -> list[dict]:
    """The questions of each record. Each item: type, question, answer, record (the id of the picture it needs),
    needs ('image': the answer is read off the stored picture; 'join': a shown picture must be matched to its
    entity, then the text world answers), shown (True when the user shows the picture: the question's
    `<image>` is a variant of the record's scene) and args."""
    out = []
    for rec in records:
        rng = sub_rng(seed, "world_link", "questions", rec["id"])
        d, name = rec["design"], rec["entity"]
        if rec["kind"] == "flag":
            out += [
                {"type": "flag_shape", "question": f"What shape is the emblem on the flag of {name}?",
                 "answer": d["emblem_shape"], "needs": "image", "shown": False, "args": {"city": name}},
                {"type": "flag_colour", "question": f"What colour is the emblem on the flag of {name}?",
                 "answer": d["emblem_colour"], "needs": "image", "shown": False, "args": {"city": name}},
                {"type": "which_city", "question": "<image> Which city has this flag?", "answer": name,
                 "needs": "join", "shown": True, "args": {}},
            ]
            attr = rng.choice(CITY_FACTS)
            out.append({"type": "city_fact", "question": f"<image> What is the {attr} of the city whose flag "
                        "this is?", "answer": rec["facts"][attr], "needs": "join", "shown": True,
                        "args": {"attribute": attr}})
        else:
            attr = rng.choice(PERSON_FACTS)
            out += [
                {"type": "badge_shape", "question": f"What shape is on the left of the badge of {name}?",
                 "answer": d["emblem_shape"], "needs": "image", "shown": False, "args": {"person": name}},
                {"type": "who_badge", "question": "<image> Who wears this badge?", "answer": name,
                 "needs": "join", "shown": True, "args": {}},
                {"type": "person_fact", "question": f"<image> What is the {attr.replace('_', ' ')} of the person "
                 "who wears this badge?", "answer": rec["facts"][attr], "needs": "join", "shown": True,
                 "args": {"attribute": attr}},
            ]
        for item in out[-(4 if rec["kind"] == "flag" else 3):]:
            item["record"] = rec["id"]
    return out


__all__ = ["build_world_link", "link_questions", "picture_scene", "flag_scene", "badge_scene", "design_of",
           "designs", "describe", "KINDS", "QUESTION_TYPES", "CITY_FACTS", "PERSON_FACTS"]
