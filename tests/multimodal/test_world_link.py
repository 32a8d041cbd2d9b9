"""The shapes world joined to the text world: flags and badges are deterministic and unique, and every answer is
re-derived here from the rendered scene's objects or from the World's own fact table."""
from __future__ import annotations

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import COLOURS, Scene, render
from lmstack.multimodal.world_link import badge_scene, build_world_link, design_of, designs, flag_scene, \
    link_questions
from lmstack.world import World


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_people=30)


@pytest.fixture(scope="module")
def records(world):
    return build_world_link(world, size=64)


def test_one_flag_per_city_one_badge_per_person_all_distinct(world, records):
    flags = [r for r in records if r["kind"] == "flag"]
    badges = [r for r in records if r["kind"] == "badge"]
    assert [r["entity"] for r in flags] == [c.name for c in world.cities]
    assert [r["entity"] for r in badges] == [p.name for p in world.people]
    for group in (flags, badges):
        keys = {tuple(r["design"].values()) for r in group}
        assert len(keys) == len(group)
    assert len(designs()) == 6 * 8 * 5 * 7


def test_deterministic_and_seed_dependent(world, records):
    assert build_world_link(world, size=64) == records
    other = build_world_link(World(seed=1, n_people=30), size=64)
    assert [r["design"] for r in other] != [r["design"] for r in records]


def _largest_object(scene_dict):
    return max(scene_dict["objects"], key=lambda o: o["radius"])


def test_design_is_what_the_picture_shows(world, records):
    for rec in records:
        scene = Scene.from_dict(rec["scene"])
        pixels = np.asarray(render(scene))
        objs = rec["scene"]["objects"]
        assert all(o["visible"] == 1.0 for o in objs)  # nothing hides the emblem or the mark
        emblem = objs[0] if rec["kind"] == "badge" else _largest_object(rec["scene"])
        assert (emblem["shape"], emblem["colour"]) == (rec["design"]["emblem_shape"], rec["design"]["emblem_colour"])
        # the emblem's centre pixel carries exactly its named colour (shapes are drawn without anti-aliasing)
        assert tuple(pixels[emblem["cy"], emblem["cx"]]) == COLOURS[emblem["colour"]]
        if rec["kind"] == "badge":
            assert objs[0]["cx"] < objs[1]["cx"]  # "on the left of the badge" is the first shape
        assert rec["design"]["emblem_shape"] in rec["caption"] and rec["entity"] in rec["caption"]


def test_answers_rederived_from_scene_and_world(world, records):
    by_id = {r["id"]: r for r in records}
    questions = link_questions(world, records)
    assert {q["type"] for q in questions} == {"flag_shape", "flag_colour", "which_city", "city_fact",
                                               "badge_shape", "who_badge", "person_fact"}
    for q in questions:
        rec = by_id[q["record"]]
        objs = rec["scene"]["objects"]
        if q["type"] in ("flag_shape", "flag_colour"):
            emblem = _largest_object(rec["scene"])
            assert q["answer"] == (emblem["shape"] if q["type"] == "flag_shape" else emblem["colour"])
            assert rec["entity"] in q["question"] and not q["shown"]
        elif q["type"] == "badge_shape":
            assert q["answer"] == min(objs, key=lambda o: o["cx"])["shape"]
        elif q["type"] in ("which_city", "who_badge"):
            assert q["answer"] == rec["entity"] and q["shown"] and q["question"].startswith("<image>")
        else:
            attr = q["args"]["attribute"]
            assert q["answer"] == str(world.fact(rec["entity"], attr))
            assert rec["entity"] not in q["question"]  # the picture is the only way to the entity


def test_variants_move_the_shapes_but_keep_the_design(world):
    city = world.cities[3].name
    base, photo = flag_scene(world, city), flag_scene(world, city, variant=1)
    assert [(o.shape, o.colour) for o in base.objects] == [(o.shape, o.colour) for o in photo.objects]
    assert photo.texture == "noise"
    assert np.asarray(render(base)).tobytes() != np.asarray(render(photo)).tobytes()
    assert all(abs(a.cx - b.cx) <= 3 and abs(a.cy - b.cy) <= 3 for a, b in zip(base.objects, photo.objects))
    assert flag_scene(world, city, variant=1) == photo
    person = world.people[0].name
    assert badge_scene(world, person).objects[0].shape == design_of(world, person, "badge")[0]


def test_bad_input_names_the_problem(world):
    with pytest.raises(LmstackError, match="no city named"):
        flag_scene(world, "Atlantis")
    with pytest.raises(LmstackError, match="picture kind"):
        design_of(world, world.cities[0].name, "banner")
    with pytest.raises(LmstackError, match="variant"):
        flag_scene(world, world.cities[0].name, variant=-1)
    with pytest.raises(LmstackError, match="size"):
        flag_scene(world, world.cities[0].name, size=8)
