"""The shapes world (issue 24 §1): deterministic scenes and pictures, answers re-derived from the scene by code
written here (not the generator's), held-out compositions, referring expressions, reasoning chains, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack import cli
from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import COLOURS, Obj, Scene, occlusion, render
from lmstack.multimodal.vision_world import HELDOUT_PAIRS, MARGIN, SPLITS, build_vision_world, png_bytes, \
    write_vision_world

N, SIDE = 60, 64


@pytest.fixture(scope="module")
def records():
    return build_vision_world(N, SIDE, seed=0)


def objects(rec):
    return rec["scene"]["objects"]


def find(rec, name):
    """The one object called `name` ('red circle') in the record's scene; fails if there is not exactly one."""
    hits = [i for i, o in enumerate(objects(rec)) if f"{o['colour']} {o['shape']}" == name]
    assert len(hits) == 1, f"{name!r} is not unique in {rec['id']}"
    return hits[0]


def holds(o, anchor, rel, side):
    """Our own reading of a relation, by centres, with the documented margin; None when too close."""
    delta = {"left of": anchor["cx"] - o["cx"], "right of": o["cx"] - anchor["cx"],
             "above": anchor["cy"] - o["cy"], "below": o["cy"] - anchor["cy"]}[rel]
    return None if abs(delta) < MARGIN * side else delta > 0


def test_same_seed_gives_identical_records_and_pngs_and_another_seed_differs(tmp_path, records):
    a, b = write_vision_world(tmp_path / "a", 12, SIDE, seed=3), write_vision_world(tmp_path / "b", 12, SIDE, seed=3)
    assert a["files"] == b["files"]
    pngs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(pngs) == 12
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in pngs)
    assert build_vision_world(N, SIDE, seed=0) == records
    other = build_vision_world(N, SIDE, seed=1)
    assert [r["scene"] for r in other] != [r["scene"] for r in records]
    assert png_bytes(Scene.from_dict(other[0]["scene"])) != png_bytes(Scene.from_dict(records[0]["scene"]))


def test_every_split_is_present_and_scenes_vary(records):
    assert {r["split"] for r in records} == set(SPLITS)
    counts = [len(objects(r)) for r in records]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 4
    assert len({r["scene"]["texture"] for r in records}) == 4 and len({r["scene"]["background"] for r in records}) >= 2


def test_every_vqa_answer_rederived_from_the_scene_matches(records):
    types = set()
    for rec in records:
        objs = objects(rec)
        for item in rec["vqa"]:
            kind, args = item["type"], item["args"]
            types.add(kind)
            if kind == "count":
                want = sum(all(o[k] == v for k, v in args.items()) for o in objs)
                assert item["answer"] == str(want), item
            elif kind == "colour":
                (o,) = [o for o in objs if o["shape"] == args["shape"]]
                assert item["answer"] == o["colour"]
            elif kind == "yesno":
                (o,) = [o for o in objs if o["shape"] == args["shape"]]
                assert item["answer"] == ("yes" if o["colour"] == args["colour"] else "no")
            elif kind == "exists":
                hit = any(o["colour"] == args["colour"] and o["shape"] == args["shape"] for o in objs)
                assert item["answer"] == ("yes" if hit else "no")
            elif kind == "position":
                a, b = objs[find(rec, args["target"])], objs[find(rec, args["anchor"])]
                verdict = holds(a, b, args["relation"], rec["scene"]["size"])
                assert verdict is not None and item["answer"] == ("yes" if verdict else "no"), item
            else:
                pytest.fail(f"unknown vqa type {kind}")
    assert types == {"count", "colour", "yesno", "exists", "position"}


def test_heldout_pairs_never_in_train_val_test_and_always_in_test_heldout(records):
    pairs = {tuple(p) for p in HELDOUT_PAIRS}
    seen_heldout = set()
    for rec in records:
        present = {(o["colour"], o["shape"]) for o in objects(rec)}
        if rec["split"] == "test_heldout":
            assert present & pairs, rec["id"]
            seen_heldout |= present & pairs
        else:
            assert not present & pairs, rec["id"]
    more = build_vision_world(200, 32, seed=5)
    assert not any((o["colour"], o["shape"]) in pairs for r in more if r["split"] == "train" for o in objects(r))
    seen_heldout |= {(o["colour"], o["shape"]) for r in more if r["split"] == "test_heldout" for o in objects(r)}
    assert pairs <= seen_heldout
    # each held-out pair's colour and shape are seen in training, only never together
    train = [o for r in records + more if r["split"] == "train" for o in objects(r)]
    assert all(any(o["colour"] == c for o in train) and any(o["shape"] == s for o in train) for c, s in pairs)


def test_referring_expressions_resolve_to_exactly_one_object(records):
    relational = 0
    for rec in records:
        objs, side = objects(rec), rec["scene"]["size"]
        for ref in rec["referring"]:
            args = ref["args"]
            if "anchor" in args:
                relational += 1
                a_idx = find(rec, args["anchor"])
                cands = [i for i, o in enumerate(objs) if o["shape"] == args["shape"] and i != a_idx
                         and holds(o, objs[a_idx], args["relation"], side)]
                assert ref["expression"] == f"the {args['shape']} {args['relation']} the {args['anchor']}"
            else:
                cands = [i for i, o in enumerate(objs) if (o["colour"], o["shape"]) == (args["colour"], args["shape"])]
                assert ref["expression"] == f"the {args['colour']} {args['shape']}"
            assert cands == [ref["target"]], ref
            assert ref["bbox"] == objs[ref["target"]]["bbox"]
    assert relational > 0


def test_multistep_chains_are_checkable_and_end_in_the_answer(records):
    total = 0
    for rec in records:
        objs, side = objects(rec), rec["scene"]["size"]
        for q in rec["multistep"]:
            total += 1
            steps = {s["op"]: s for s in q["chain"]}
            assert [s["op"] for s in q["chain"]] == ["find", "filter_colour", "filter_relation", "count"]
            a_idx = find(rec, q["args"]["anchor"])
            assert steps["find"]["result"] == a_idx
            coloured = [i for i, o in enumerate(objs) if o["colour"] == q["args"]["colour"] and i != a_idx]
            assert steps["filter_colour"]["result"] == coloured
            verdicts = [holds(objs[i], objs[a_idx], q["args"]["relation"], side) for i in coloured]
            assert None not in verdicts  # the ambiguity guard: nothing sits on the anchor's line
            assert steps["filter_relation"]["result"] == [i for i, v in zip(coloured, verdicts) if v]
            assert q["chain"][-1]["result"] == len(steps["filter_relation"]["result"])
            assert str(q["chain"][-1]["result"]) == q["answer"]
            assert q["question"] == f"How many {q['args']['colour']} shapes are {q['args']['relation']} the " \
                                    f"{q['args']['anchor']}?"
    assert total > 0


def test_occlusion_is_recorded_and_matches_the_pixels():
    bottom, top = Obj("square", "red", "large", 30, 30, 10), Obj("circle", "blue", "large", 38, 30, 10)
    scene = Scene(64, "gray", "plain", 0, (bottom, top))
    visible = occlusion(scene)
    assert visible[1] == 1.0 and 0.3 < visible[0] < 0.9
    d = scene.to_dict()["objects"]
    assert d[0]["occluded"] and not d[1]["occluded"] and d[0]["z"] == 0 and d[1]["z"] == 1
    pixels = np.asarray(render(scene))
    red = (pixels == COLOURS["red"]).all(-1).sum()
    assert red == pytest.approx(visible[0] * 441, abs=2)  # 21x21 square, of which `visible` is still red
    assert Scene.from_dict(scene.to_dict()) == scene
    assert any(o["occluded"] for r in build_vision_world(60, SIDE, seed=2) for o in objects(r))


@pytest.mark.parametrize("texture", ["plain", "stripes", "dots", "noise"])
def test_a_rendered_circle_has_its_colour_at_its_centre(texture):
    scene = Scene(64, "white", texture, 7, (Obj("circle", "green", "small", 12, 50, 5),
                                              Obj("star", "purple", "large", 45, 20, 9)))
    image = render(scene)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((12, 50)) == COLOURS["green"] and image.getpixel((45, 20)) == COLOURS["purple"]
    assert image.getpixel((0, 0)) != COLOURS["green"]
    assert render(scene).tobytes() == image.tobytes()


def test_the_cli_writes_images_jsonl_and_manifest(tmp_path, capsys):
    out = tmp_path / "vis"
    cli.run(["data", "synth-vision", "--out", str(out), "--n-images", "8", "--size", "48", "--seed", "4"])
    assert "wrote 8 images" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 4 and sum(manifest["counts"].values()) == 8
    assert [list(p) for p in HELDOUT_PAIRS] == manifest["heldout_pairs"]
    rows = [json.loads(line) for s in SPLITS for line in (out / f"{s}.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert {"id", "path", "scene", "captions", "vqa", "referring", "multistep"} <= set(row)
        assert row["path"] == f"images/{row['split']}/{row['id']}.png"
        assert (out / row["path"]).read_bytes() == png_bytes(Scene.from_dict(row["scene"]))
        assert len(row["captions"]) >= 3 and all(isinstance(c, str) and c for c in row["captions"])
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("call, word", [
    (lambda: build_vision_world(0, 64, 0), "n_images"),
    (lambda: build_vision_world(4, 16, 0), "size"),
    (lambda: build_vision_world(4, 1024, 0), "size"),
    (lambda: Obj("circle", "mauve", "small", 10, 10, 4), "colour 'mauve'"),
    (lambda: Obj("hexagon", "red", "small", 10, 10, 4), "shape 'hexagon'"),
    (lambda: Scene(64, "tartan"), "background 'tartan'"),
    (lambda: Scene.from_dict({"size": 64}), "malformed scene"),
])
def test_bad_input_raises_a_clear_error_naming_it(call, word):
    with pytest.raises(LmstackError, match=word):
        call()
