"""The shapes world: random scenes with their paired text -- captions, VQA, referring expressions and
multi-step questions with reasoning chains -- split train/val/test/test_heldout, and written to disk.

Every answer is computed from the Scene (shapes.py), never from text, and every question item keeps its
structured arguments, so a test (or a reward) can re-derive the answer from the scene alone.

Held-out compositions (zero-shot tests): the (colour, shape) pairs in HELDOUT_PAIRS -- green star, red
triangle, blue cross, yellow diamond -- never occur in a train, val or test image; each image of the
`test_heldout` split holds at least one of them. Their colours and shapes are each seen in training,
only never together.

Ambiguity guard: an object is named by its colour and shape ("the red circle"), and a question about it
is asked only when that name is unique in the scene. A left/right/above/below relation is asked only when
every object it concerns sits at least MARGIN of the image side away from the anchor on that axis, so
no answer hangs on a pixel or two.

Usage:
    from lmstack.multimodal.vision_world import build_vision_world, synth_vision
    records = build_vision_world(n_images=20, size=64, seed=0)     # in memory: scene, captions, vqa, ...
    synth_vision("data/vision", n_images=200, size=64, seed=0)      # out/images/<split>/<id>.png + <split>.jsonl
    # CLI: lmstack data synth-vision --out data/vision --n_images 200 --size 64 --seed 0
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from lmstack.config import atomic_write_bytes, atomic_write_text
from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES, Obj, Scene, check_side, \
    radius_for, render
from lmstack.world.config import sub_rng

SPLITS = ("train", "val", "test", "test_heldout")
SPLIT_FRACTIONS = (0.7, 0.1, 0.1, 0.1)
HELDOUT_PAIRS = (("green", "star"), ("red", "triangle"), ("blue", "cross"), ("yellow", "diamond"))
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign)
MARGIN = 0.06  # fraction of the side an object must be clear of its anchor for a relation to count
MAX_OBJECTS = 6


def relation(obj: Obj, anchor: Obj, rel: str, side: int) -> bool | None:
    """Whether `obj` is `rel` ('left of', 'right of', 'above', 'below') `anchor`, by centres.

    None when the centres are under MARGIN of the side apart on that axis: too close to call."""
    axis, sign = RELATIONS[rel]
    delta = (obj.cx - anchor.cx) if axis == 0 else (obj.cy - anchor.cy)
    if abs(delta) < MARGIN * side:
        return None
    return delta * sign > 0


def name(obj: Obj) -> str:
    return f"{obj.colour} {obj.shape}"


def _unique(scene: Scene, obj: Obj) -> bool:
    return sum(1 for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape)) == 1


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "noise": "noisy"}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def sample_scene(rng, size: int, heldout: bool) -> Scene:
    """A random scene; `heldout` scenes hold at least one HELDOUT_PAIRS pair, the others none."""
    allowed = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == heldout]
    ordinary = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    n = rng.randint(1, MAX_OBJECTS)
    required = rng.choice(allowed)
    pairs = [required] + [rng.choice(ordinary) for _ in range(n - 1)]
    rng.shuffle(pairs)
    allow_overlap = rng.random() < 0.3  # occlusion in about a third of the scenes
    objects: list[Obj] = []
    for colour, shape in pairs:
        size_name = rng.choice(sorted(SIZES))
        r = radius_for(size_name, size)
        for _ in range(30):  # rejection sampling; a crowded scene simply ends up with fewer objects
            cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
            clear = all(max(abs(cx - o.cx), abs(cy - o.cy)) > r + o.radius for o in objects)
            # an overlap must leave the lower object mostly visible: centres kept a radius apart
            near = all(max(abs(cx - o.cx), abs(cy - o.cy)) > max(r, o.radius) for o in objects)
            if clear or (allow_overlap and near):
                objects.append(Obj(shape, colour, size_name, cx, cy, r))
                break
    if heldout and not any((o.colour, o.shape) in HELDOUT_PAIRS for o in objects):
        first = objects[0]  # the held-out object found no room: it takes the place of the first one drawn
        objects[0] = Obj(required[1], required[0], first.size, first.cx, first.cy, first.radius)
    return Scene(size, rng.choice(sorted(BACKGROUNDS)), rng.choice(TEXTURES), rng.randrange(2 ** 31), tuple(objects))


def captions(scene: Scene, rng) -> list[str]:
    """Several descriptions of the scene, from different templates (each lists every object)."""
    objs = scene.objects
    names = [_a(f"{o.size} {name(o)}") for o in objs]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    by_x = ", ".join(_a(name(o)) for o in sorted(objs, key=lambda o: (o.cx, o.cy)))
    n = len(objs)
    shapes_word = "shape" if n == 1 else "shapes"
    out = [f"{listed[0].upper()}{listed[1:]} on a {scene.background} background.",
           f"There {'is' if n == 1 else 'are'} {n} {shapes_word}: {listed}.",
           f"From left to right: {by_x}.",
           f"A picture of {listed}, with a {TEXTURE_WORDS[scene.texture]} {scene.background} background.",
           f"In this image you can see {listed}."]
    rng.shuffle(out)
    return out


def _count(scene: Scene, colour: str | None = None, shape: str | None = None) -> int:
    return sum(1 for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape))


def vqa(scene: Scene, rng) -> list[dict]:
    """Question/answer items by type: count, colour, position, exists, yesno; each keeps its args."""
    side, objs, items = scene.size, scene.objects, []
    items.append({"type": "count", "question": "How many shapes are there?", "args": {}, "answer": str(len(objs))})
    colour = rng.choice(sorted(COLOURS))
    items.append({"type": "count", "question": f"How many {colour} shapes are there?", "args": {"colour": colour},
                  "answer": str(_count(scene, colour=colour))})
    shape = rng.choice(SHAPES)
    items.append({"type": "count", "question": f"How many {_plural(shape)} are there?", "args": {"shape": shape},
                  "answer": str(_count(scene, shape=shape))})
    for shape in sorted({o.shape for o in objs}):
        if _count(scene, shape=shape) == 1:
            obj = next(o for o in objs if o.shape == shape)
            items.append({"type": "colour", "question": f"What colour is the {shape}?", "args": {"shape": shape},
                          "answer": obj.colour})
    uniq = [o for o in objs if _unique(scene, o)]
    for a in uniq:
        for b in uniq:
            if a is b:
                continue
            rel = rng.choice(sorted(RELATIONS))
            truth = relation(a, b, rel, side)
            if truth is not None:
                items.append({"type": "position", "question": f"Is the {name(a)} {rel} the {name(b)}?",
                              "args": {"target": name(a), "anchor": name(b), "relation": rel},
                              "answer": "yes" if truth else "no"})
    present = rng.choice(objs)
    absent_colour, absent_shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    for c, s in ((present.colour, present.shape), (absent_colour, absent_shape)):
        items.append({"type": "exists", "question": f"Is there a {c} {s}?", "args": {"colour": c, "shape": s},
                      "answer": "yes" if _count(scene, c, s) else "no"})
    for shape in sorted({o.shape for o in objs if _count(scene, shape=o.shape) == 1})[:2]:
        obj = next(o for o in objs if o.shape == shape)
        asked = obj.colour if rng.random() < 0.5 else rng.choice(sorted(COLOURS))
        items.append({"type": "yesno", "question": f"Is the {shape} {asked}?",
                      "args": {"shape": shape, "colour": asked},
                      "answer": "yes" if obj.colour == asked else "no"})
    return items


def referring(scene: Scene) -> list[dict]:
    """Expressions that pick out exactly one object: by unique name, or by shape plus a relation to a unique anchor."""
    side, objs, out = scene.size, scene.objects, []
    for i, o in enumerate(objs):
        if _unique(scene, o):
            out.append({"expression": f"the {name(o)}", "target": i, "bbox": list(o.bbox),
                        "args": {"colour": o.colour, "shape": o.shape}})
    for i, o in enumerate(objs):
        if _count(scene, shape=o.shape) < 2:
            continue  # "the circle" alone already names it; the relation is for shapes that repeat
        for anchor in objs:
            if anchor is o or not _unique(scene, anchor):
                continue
            for rel in sorted(RELATIONS):
                same = [p for p in objs if p.shape == o.shape and p is not anchor]
                verdicts = [relation(p, anchor, rel, side) for p in same]
                if None in verdicts or verdicts.count(True) != 1 or relation(o, anchor, rel, side) is not True:
                    continue
                out.append({"expression": f"the {o.shape} {rel} the {name(anchor)}", "target": i,
                            "bbox": list(o.bbox), "args": {"shape": o.shape, "relation": rel, "anchor": name(anchor)}})
    return out


def multistep(scene: Scene, rng) -> list[dict]:
    """'How many <colour> shapes are <rel> the <anchor>?' with its chain: find, filter colour, filter side, count."""
    side, objs, out = scene.size, scene.objects, []
    for a_idx, anchor in enumerate(objs):
        if not _unique(scene, anchor):
            continue
        rel = rng.choice(sorted(RELATIONS))
        others = [i for i, o in enumerate(objs) if i != a_idx]
        if any(relation(objs[i], anchor, rel, side) is None for i in others):
            continue  # an object too close to the anchor's line would make the count a guess
        colour = rng.choice(sorted({objs[i].colour for i in others} or set(COLOURS)))
        coloured = [i for i in others if objs[i].colour == colour]
        sided = [i for i in coloured if relation(objs[i], anchor, rel, side)]
        steps = [
            {"op": "find", "args": {"name": name(anchor)}, "result": a_idx,
             "text": f"The {name(anchor)} is object {a_idx} at ({anchor.cx}, {anchor.cy})."},
            {"op": "filter_colour", "args": {"colour": colour}, "result": coloured,
             "text": f"The other {colour} shapes are objects {coloured}."},
            {"op": "filter_relation", "args": {"relation": rel}, "result": sided,
             "text": f"Of those, {sided} are {rel} the {name(anchor)}."},
            {"op": "count", "args": {}, "result": len(sided), "text": f"That makes {len(sided)}."},
        ]
        out.append({"question": f"How many {colour} shapes are {rel} the {name(anchor)}?",
                    "args": {"anchor": name(anchor), "colour": colour, "relation": rel},
                    "chain": steps, "answer": str(len(sided))})
    return out


def split_of(seed: int, index: int, world: str = "vision", splits=SPLITS, fractions=SPLIT_FRACTIONS) -> str:
    """The split of item `index`: a seeded draw against the fractions (the video world draws its own)."""
    u, acc = sub_rng(seed, world, "split", index).random(), 0.0
    for split, frac in zip(splits, fractions):
        acc += frac
        if u < acc:
            return split
    return splits[-1]


def build_vision_world(n_images: int = 200, size: int = 64, seed: int = 0) -> list[dict]:
    """`n_images` records (id, split, scene, captions, vqa, referring, multistep); a pure function of its arguments."""
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 1:
        raise LmstackError(f"n_images must be an integer >= 1, got {n_images!r}")
    check_side(size)
    records = []
    for i in range(n_images):
        split = split_of(seed, i)
        scene = sample_scene(sub_rng(seed, "vision", "scene", i), size, heldout=split == "test_heldout")
        text_rng = sub_rng(seed, "vision", "text", i)
        records.append({"id": f"img{i:06d}", "split": split, "scene": scene.to_dict(),
                        "captions": captions(scene, text_rng), "vqa": vqa(scene, text_rng),
                        "referring": referring(scene), "multistep": multistep(scene, text_rng)})
    return records


def png_bytes(scene: Scene) -> bytes:
    """The rendered scene as PNG bytes (no metadata, so the bytes depend on the pixels alone)."""
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG")
    return buf.getvalue()


def write_vision_world(out: str | os.PathLike, n_images: int = 200, size: int = 64, seed: int = 0) -> dict:
    """Write out/images/<split>/<id>.png, out/<split>.jsonl and out/manifest.json (last); returns the manifest."""
    records = build_vision_world(n_images, size, seed)
    out = Path(out)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rec in records:
        rel_path = f"images/{rec['split']}/{rec['id']}.png"
        atomic_write_bytes(out / rel_path, png_bytes(Scene.from_dict(rec["scene"])))
        lines[rec["split"]].append(json.dumps(dict(rec, path=rel_path), ensure_ascii=False))
    files = {}
    for split in SPLITS:
        text = "".join(line + "\n" for line in lines[split])
        atomic_write_text(out / f"{split}.jsonl", text)
        files[f"{split}.jsonl"] = {"records": len(lines[split]), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    manifest = {"seed": seed, "size": size, "n_images": n_images, "counts": {s: len(lines[s]) for s in SPLITS},
                "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
                "split_fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
                "shapes": list(SHAPES), "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
                "textures": list(TEXTURES), "files": files,
                "items": {k: sum(len(r[k]) for r in records) for k in ("captions", "vqa", "referring", "multistep")}}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def synth_vision(out: str = "data/vision", n_images: int = 200, size: int = 64, seed: int = 0) -> None:
    """Generate the shapes world (PNG images plus captions, VQA, referring expressions, multi-step questions).

    Args:
        out: Output folder; gets images/<split>/<id>.png, <split>.jsonl (train, val, test, test_heldout), manifest.json.
        n_images: Number of images (at least 1).
        size: Image side in pixels (32..512).
        seed: Random seed; the same seed gives byte-identical files.
    """
    manifest = write_vision_world(out, n_images, size, seed)
    counts = ", ".join(f"{s} {n}" for s, n in manifest["counts"].items())
    items = ", ".join(f"{k} {n:,}" for k, n in manifest["items"].items())
    print(f"wrote {n_images} images ({size}x{size}) to {out}: {counts}; {items}; "
          f"held-out pairs {', '.join(' '.join(p) for p in HELDOUT_PAIRS)}")



def read_split_lines(data: str | os.PathLike, split: str, world: str, command: str) -> tuple[Path, Path, list]:
    """(root, split file, [(line number, parsed JSON)]) of `<data>/<split>.jsonl` in a generated world (the shapes
    world, the video world): the manifest must exist, the file stays inside the directory, blank lines are skipped
    and a line that is not JSON is an error naming it. Each caller checks its own record shape."""
    from lmstack.model.load_guard import resolve_inside  # lazy: the world writer does not need the model package

    root = Path(data)
    if not (root / "manifest.json").is_file():
        raise LmstackError(f"no {world} at {root} (manifest.json missing); write one with `{command} --out {root}`")
    file = resolve_inside(root, f"{split}.jsonl", "split file")
    if not file.is_file():
        raise LmstackError(f"{file} not found; rewrite the world with `{command} --out {root}`")
    lines = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LmstackError(f"{file} line {n} is not JSON: {e.msg}") from None
    return root, file, lines

__all__ = ["build_vision_world", "write_vision_world", "synth_vision", "sample_scene", "captions", "vqa", "referring",
           "multistep", "relation", "png_bytes", "read_split_lines", "SPLITS", "HELDOUT_PAIRS", "RELATIONS", "MARGIN"]
