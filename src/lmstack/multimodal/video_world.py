"""The video world: short clips of moving shapes (issue 25 §1), with captions and temporal questions.

A clip is `frames` pictures of the shapes world (shapes.py) over time: 1..4 objects, each with a velocity
(some stand still) that bounces off the walls, an entry frame (some enter after the start) and an exit
frame (some leave before the end). The per-frame object states are stored with the clip, and every answer
is computed from them, never from the text, so a test can re-derive each one.

Questions carry a `frame_order_sensitive` flag: True when a model that only sees the average (or any
reordering) of the frames cannot know the answer. Order and direction questions are asked only when the
reversed clip -- the same frames, so the same average -- has a different answer; a count at the end is
sensitive when the count changes over the clip; whether two shapes ever touch is not.

Ambiguity guards: every object's (colour, shape) name is unique in its clip; a direction is asked only
when the motion is monotone along one clearly dominant axis; a touch question only when the closest
approach is more than a pixel away from the boundary of touching.

Files: out/clips/<split>/<id>.png is a sprite sheet (the frames side by side, width = frames x height), so
no pickle is needed; out/<split>.jsonl holds the records and out/manifest.json is written last.

Usage:
    from lmstack.multimodal.video_world import build_video_world, synth_video, load_video_clip
    records = build_video_world(n_clips=20, frames=12, size=64, seed=0)
    synth_video("data/video", n_clips=200, frames=12, size=64, seed=0)
    clip = load_video_clip("data/video/clips/train/clip000000.png", frames=12)   # uint8 (12, 64, 64, 3)
    # CLI: lmstack data synth-video --out data/video --n_clips 200
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from lmstack.config import atomic_write_bytes, atomic_write_text
from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES, Obj, Scene, radius_for, render
from lmstack.multimodal.vision_world import split_of
from lmstack.world.config import sub_rng

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MIN_FRAMES, MAX_FRAMES = 2, 32
MIN_SIZE, MAX_SIZE = 32, 128
MAX_OBJECTS = 4
MIN_MOVE = 0.1  # fraction of the side an object must travel for its direction to be asked
DIRECTIONS = ("left", "right", "up", "down", "none")


def _check_int(label: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LmstackError(f"{label} must be an integer in {lo}..{hi}, got {value!r}")


def _bounce(pos: float, vel: float, lo: int, hi: int) -> tuple[float, float, str | None]:
    """One step of motion inside [lo, hi], reflected at a wall; returns the new position, velocity, wall hit."""
    pos += vel
    if pos < lo:
        return 2 * lo - pos, -vel, "low"
    if pos > hi:
        return 2 * hi - pos, -vel, "high"
    return pos, vel, None


def sample_clip(rng, frames: int, size: int) -> dict:
    """A random clip: background, objects (name, radius, entry/exit frames), per-frame states and wall bounces."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.sample(pairs, rng.randint(1, MAX_OBJECTS))  # distinct names: "the red circle" is never ambiguous
    speed = 0.06 * size
    objects, tracks, bounces = [], [], []
    for i, (colour, shape) in enumerate(chosen):
        size_name = rng.choice(sorted(SIZES))
        r = radius_for(size_name, size)
        x, y = float(rng.randint(r, size - 1 - r)), float(rng.randint(r, size - 1 - r))
        kind = rng.random()
        if kind < 0.2:
            vx = vy = 0.0  # some shapes stand still
        elif kind < 0.6:  # axis-aligned motion, so direction questions are common
            v = rng.choice((-1, 1)) * rng.uniform(0.5, 1.0) * speed
            vx, vy = (v, 0.0) if rng.random() < 0.5 else (0.0, v)
        else:
            vx, vy = rng.uniform(-speed, speed), rng.uniform(-speed, speed)
        enter = 0 if rng.random() < 0.6 or frames < 3 else rng.randint(1, frames // 2)
        leave = frames - 1 if rng.random() < 0.75 or enter >= frames - 2 else rng.randint(enter + 1, frames - 2)
        objects.append({"id": i, "shape": shape, "colour": colour, "size": size_name, "radius": r,
                        "enter": enter, "leave": leave, "velocity": [round(vx, 3), round(vy, 3)]})
        track = []
        for t in range(frames):
            if t:
                x, vx, wall_x = _bounce(x, vx, r, size - 1 - r)
                y, vy, wall_y = _bounce(y, vy, r, size - 1 - r)
                for wall, names in ((wall_x, ("left", "right")), (wall_y, ("top", "bottom"))):
                    if wall and enter <= t <= leave:
                        bounces.append({"id": i, "frame": t, "wall": names[wall == "high"]})
            track.append((int(round(x)), int(round(y))))
        tracks.append(track)
    states = [[{"id": o["id"], "cx": tracks[o["id"]][t][0], "cy": tracks[o["id"]][t][1]}
               for o in objects if o["enter"] <= t <= o["leave"]] for t in range(frames)]
    return {"frames": frames, "size": size, "background": rng.choice(sorted(BACKGROUNDS)),
            "texture": rng.choice(TEXTURES), "texture_seed": rng.randrange(2 ** 31), "objects": objects,
            "states": states, "bounces": sorted(bounces, key=lambda b: (b["frame"], b["id"]))}


def frame_scenes(clip: dict) -> list[Scene]:
    """The Scene of each frame (objects drawn in id order), built from the stored states alone."""
    by_id = {o["id"]: o for o in clip["objects"]}
    return [Scene(clip["size"], clip["background"], clip["texture"], clip["texture_seed"],
                  tuple(Obj(by_id[s["id"]]["shape"], by_id[s["id"]]["colour"], by_id[s["id"]]["size"], s["cx"],
                            s["cy"], by_id[s["id"]]["radius"]) for s in frame))
            for frame in clip["states"]]


def name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _visible(states: list[list[dict]], oid: int) -> list[int]:
    return [t for t, frame in enumerate(states) if any(s["id"] == oid for s in frame)]


def _position(states, oid: int, t: int) -> tuple[int, int]:
    s = next(s for s in states[t] if s["id"] == oid)
    return s["cx"], s["cy"]


def collisions(clip: dict, states: list[list[dict]] | None = None) -> list[dict]:
    """Each frame where two objects' boxes start to overlap (first frame of each contact), from the states."""
    states = clip["states"] if states is None else states
    radius = {o["id"]: o["radius"] for o in clip["objects"]}
    out, touching = [], set()
    for t, frame in enumerate(states):
        now = set()
        for i, a in enumerate(frame):
            for b in frame[i + 1:]:
                if max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) <= radius[a["id"]] + radius[b["id"]]:
                    now.add((min(a["id"], b["id"]), max(a["id"], b["id"])))
        out += [{"objects": list(pair), "frame": t} for pair in sorted(now - touching)]
        touching = now
    return out


def direction(states, oid: int, size: int) -> str | None:
    """'left'/'right'/'up'/'down', 'none' when it never moves, None when the motion has no clear direction."""
    seen = _visible(states, oid)
    path = [_position(states, oid, t) for t in seen]
    if len(path) < 2:
        return None
    if all(p == path[0] for p in path):
        return "none"
    dx, dy = path[-1][0] - path[0][0], path[-1][1] - path[0][1]
    axis, main, other = (0, dx, dy) if abs(dx) >= abs(dy) else (1, dy, dx)
    steps = [b[axis] - a[axis] for a, b in zip(path, path[1:])]
    monotone = all(s * main >= 0 for s in steps)
    if not monotone or abs(main) < max(3, MIN_MOVE * size) or abs(other) * 2 > abs(main):
        return None  # a bounce, a diagonal or a crawl: no one word is clearly right
    return ("right" if main > 0 else "left") if axis == 0 else ("down" if main > 0 else "up")


def entered_after(clip: dict, states, oid: int) -> str | None:
    """The name of the next object to appear after `oid` appears; None when there is none or a tie."""
    seen = _visible(states, oid)
    if not seen:
        return None
    firsts = {o["id"]: _visible(states, o["id"]) for o in clip["objects"] if o["id"] != oid}
    later = {k: v[0] for k, v in firsts.items() if v and v[0] > seen[0]}
    if not later:
        return None
    soonest = min(later.values())
    hits = [k for k, f in later.items() if f == soonest]
    return name(clip["objects"][hits[0]]) if len(hits) == 1 else None


def appeared_first(clip: dict, states, a: int, b: int) -> str | None:
    """The name of whichever of `a`, `b` appears first; None when they appear together (or one never does)."""
    fa, fb = _visible(states, a), _visible(states, b)
    if not fa or not fb or fa[0] == fb[0]:
        return None
    return name(clip["objects"][a if fa[0] < fb[0] else b])


def _touch_gap(clip: dict, a: int, b: int) -> int | None:
    """Smallest box gap in pixels over frames where both show (<= 0: the boxes touch); None if never together."""
    ra, rb = clip["objects"][a]["radius"], clip["objects"][b]["radius"]
    gaps = [max(abs(pa["cx"] - pb["cx"]), abs(pa["cy"] - pb["cy"])) - ra - rb
            for frame in clip["states"] for pa in frame for pb in frame if pa["id"] == a and pb["id"] == b]
    return min(gaps) if gaps else None


def _item(qtype: str, question: str, args: dict, answer: str, sensitive: bool) -> dict:
    return {"type": qtype, "question": question, "args": args, "answer": answer, "frame_order_sensitive": sensitive}


def questions(clip: dict, rng) -> list[dict]:
    """Temporal questions by type (order, count, direction, collision), each with args and the order flag."""
    objs, states, size = clip["objects"], clip["states"], clip["size"]
    rev = states[::-1]
    items = []
    for o in objs:  # order: asked only when the reversed clip (same average frame) answers differently
        ans = entered_after(clip, states, o["id"])
        if ans is not None and entered_after(clip, rev, o["id"]) != ans:
            items.append(_item("order", f"What entered after the {name(o)}?", {"after": name(o)}, ans, True))
    for a in objs:
        for b in objs:
            if a["id"] < b["id"] and rng.random() < 0.5:
                ans = appeared_first(clip, states, a["id"], b["id"])
                if ans is not None and appeared_first(clip, rev, a["id"], b["id"]) != ans:
                    items.append(_item("order", f"Which appeared first, the {name(a)} or the {name(b)}?",
                                       {"a": name(a), "b": name(b)}, ans, True))
    counts = [len(f) for f in states]
    varies = len(set(counts)) > 1  # a frame average cannot tell which count belongs to which moment
    items.append(_item("count", "How many shapes are there at the end?", {"frame": "end"}, str(counts[-1]), varies))
    items.append(_item("count", "How many shapes are there at the start?", {"frame": "start"}, str(counts[0]), varies))
    k = rng.randrange(len(states))
    items.append(_item("count", f"How many shapes are there in frame {k}?", {"frame": k}, str(counts[k]), varies))
    items.append(_item("count", "How many different shapes appear in the clip?", {"frame": "any"},
                       str(len({s["id"] for f in states for s in f})), False))
    for o in objs:
        ans = direction(states, o["id"], size)
        if ans is not None:
            items.append(_item("direction", f"Which way does the {name(o)} move?", {"target": name(o)}, ans,
                               direction(rev, o["id"], size) != ans))
    for a in objs:
        for b in objs:
            if a["id"] < b["id"]:
                gap = _touch_gap(clip, a["id"], b["id"])
                if gap is not None and abs(gap) > 1:  # a one-pixel graze is too close to call
                    items.append(_item("collision", f"Do the {name(a)} and the {name(b)} touch?",
                                       {"a": name(a), "b": name(b)}, "yes" if gap <= 0 else "no", False))
    rng.shuffle(items)
    return items


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def captions(clip: dict) -> list[str]:
    """What is there at the start, what each shape did (entered, moved, left), bounces, contacts, the end count."""
    objs, states, size, last = clip["objects"], clip["states"], clip["size"], clip["frames"] - 1
    present = [_a(name(objs[s["id"]])) for s in states[0]]
    listed = "no shapes" if not present else present[0] if len(present) == 1 else \
        ", ".join(present[:-1]) + " and " + present[-1]
    out = [f"At the start there {'is' if len(present) == 1 else 'are'} {listed} on a {clip['background']} background."]
    for o in objs:
        way = direction(states, o["id"], size)
        if o["enter"] > 0:
            out.append(f"The {name(o)} enters at frame {o['enter']}.")
        if way == "none":
            out.append(f"The {name(o)} stays still.")
        elif way is not None:
            out.append(f"The {name(o)} moves {way}.")
        if o["leave"] < last:
            out.append(f"The {name(o)} leaves after frame {o['leave']}.")
    for b in clip["bounces"]:
        out.append(f"The {name(objs[b['id']])} bounces off the {b['wall']} wall at frame {b['frame']}.")
    for c in clip["collisions"]:
        a, b = (objs[i] for i in c["objects"])
        out.append(f"The {name(a)} and the {name(b)} touch at frame {c['frame']}.")
    out.append(f"At the end there {'is' if len(states[-1]) == 1 else 'are'} {len(states[-1])} "
               f"shape{'' if len(states[-1]) == 1 else 's'}.")
    return out


def check_args(n_clips: int, frames: int, size: int) -> None:
    """Raise, naming the argument, unless n_clips >= 1, frames in 2..32 and size in 32..128."""
    if not isinstance(n_clips, int) or isinstance(n_clips, bool) or n_clips < 1:
        raise LmstackError(f"n_clips must be an integer >= 1, got {n_clips!r}")
    _check_int("frames", frames, MIN_FRAMES, MAX_FRAMES)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)


def build_video_world(n_clips: int = 200, frames: int = 12, size: int = 64, seed: int = 0) -> list[dict]:
    """`n_clips` records (id, split, clip state, collisions, captions, questions); a pure function of its arguments."""
    check_args(n_clips, frames, size)
    records = []
    for i in range(n_clips):
        clip = sample_clip(sub_rng(seed, "video", "clip", i), frames, size)
        clip["collisions"] = collisions(clip)
        split = split_of(seed, i, "video", SPLITS, SPLIT_FRACTIONS)
        records.append(dict({"id": f"clip{i:06d}", "split": split}, **clip,
                            captions=captions(clip), questions=questions(clip, sub_rng(seed, "video", "text", i))))
    return records


def sheet_bytes(record: dict) -> bytes:
    """The clip's frames side by side as one PNG (width = frames x size), without metadata."""
    size = record["size"]
    sheet = Image.new("RGB", (size * record["frames"], size))
    for t, scene in enumerate(frame_scenes(record)):
        sheet.paste(render(scene), (t * size, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def load_video_clip(path: str | os.PathLike, frames: int) -> np.ndarray:
    """A sprite sheet read back as uint8 (frames, H, W, 3); refuses a sheet whose width is not frames x height."""
    _check_int("frames", frames, MIN_FRAMES, MAX_FRAMES)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise LmstackError(f"cannot read sprite sheet {str(path)!r}: {e}") from None
    h, w = arr.shape[:2]
    if w != frames * h:
        raise LmstackError(f"sprite sheet {str(path)!r} is {w}x{h}: its width must be frames x height = "
                           f"{frames} x {h} = {frames * h}")
    return np.ascontiguousarray(arr.reshape(h, frames, h, 3).transpose(1, 0, 2, 3))


def write_video_world(out: str | os.PathLike, n_clips: int = 200, frames: int = 12, size: int = 64,
                      seed: int = 0) -> dict:
    """Write out/clips/<split>/<id>.png, out/<split>.jsonl and out/manifest.json (last); returns the manifest."""
    records = build_video_world(n_clips, frames, size, seed)
    out = Path(out)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rec in records:
        rel_path = f"clips/{rec['split']}/{rec['id']}.png"
        atomic_write_bytes(out / rel_path, sheet_bytes(rec))
        lines[rec["split"]].append(json.dumps(dict(rec, path=rel_path), ensure_ascii=False))
    files = {}
    for split in SPLITS:
        text = "".join(line + "\n" for line in lines[split])
        atomic_write_text(out / f"{split}.jsonl", text)
        files[f"{split}.jsonl"] = {"records": len(lines[split]), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    qs = [q for r in records for q in r["questions"]]
    manifest = {"seed": seed, "n_clips": n_clips, "frames": frames, "size": size, "sheet": "frames side by side",
                "counts": {s: len(lines[s]) for s in SPLITS}, "split_fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
                "files": files, "collisions": sum(len(r["collisions"]) for r in records),
                "questions": {t: sum(q["type"] == t for q in qs) for t in ("order", "count", "direction", "collision")},
                "frame_order_sensitive": sum(q["frame_order_sensitive"] for q in qs)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def synth_video(out: str = "data/video", n_clips: int = 200, frames: int = 12, size: int = 64, seed: int = 0) -> None:
    """Generate the video world: clips of moving shapes as PNG sprite sheets, with captions and temporal questions.

    Args:
        out: Output folder; gets clips/<split>/<id>.png, <split>.jsonl (train, val, test), manifest.json.
        n_clips: Number of clips (at least 1).
        frames: Frames per clip (2..32).
        size: Frame side in pixels (32..128).
        seed: Random seed; the same seed gives byte-identical files.
    """
    m = write_video_world(out, n_clips, frames, size, seed)
    counts = ", ".join(f"{s} {n}" for s, n in m["counts"].items())
    kinds = ", ".join(f"{k} {n:,}" for k, n in m["questions"].items())
    print(f"wrote {n_clips} clips ({frames} frames of {size}x{size}) to {out}: {counts}; questions {kinds} "
          f"({m['frame_order_sensitive']:,} frame-order-sensitive); {m['collisions']} collisions")


__all__ = ["build_video_world", "write_video_world", "synth_video", "load_video_clip", "sheet_bytes", "sample_clip",
           "frame_scenes", "collisions", "direction", "entered_after", "appeared_first", "questions", "captions",
           "check_args", "SPLITS", "DIRECTIONS"]
