"""Multimodal chain-of-thought (issue 24 XII.5): the shapes world's multi-step questions answered directly, or
with a rationale first (Zhang et al. 2023, "Multimodal Chain-of-Thought": rationale generation, then the answer).

A multi-step item of vision_world ("How many blue shapes are left of the red circle?") keeps its gold chain:
find the anchor, keep the other shapes of the colour, keep those on the side, count. Its steps name objects by
their index in the scene's z-order, which no picture shows, so the rationale a model is trained to write says
each step in words it can read off the pixels:

    The red circle is top left. The other blue shapes: a square, a star. Of those, left of the red circle:
    a square. That makes 1. Answer: 1

(position on a 3x3 grid of the picture; shapes listed left to right; "none" for an empty list). The direct
target is "Answer: 1" alone, so both modes are parsed by the same parse_answer.

score_chain() parses a generated rationale back into its four steps and checks each against the gold step's
result (re-derived from the scene): the step found, the step's value, whether it is right, and the first step
that goes wrong -- the "errors by step" of a chain whose final answer is wrong (or right by luck).

Usage:
    from lmstack.multimodal.cot import cot_examples, score_chain, parse_answer, summarize
    train = cot_examples(records, split="train", mode="rationale")  # [{"record", "question", "prompt", "target"}]
    out = score_chain(generated_text, item, scene)                  # {"answer", "correct", "steps", "first_wrong"}
    summarize([out, ...])                                           # accuracy, n, stderr, first_wrong by step
"""
from __future__ import annotations

import math
import re
from collections import Counter

from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import Scene
from lmstack.multimodal.text import IMAGE_TOKEN

MODES = ("direct", "rationale")
STEPS = ("find", "filter_colour", "filter_relation", "count")
ANSWER_PREFIX = "Answer:"
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "middle", "right")


def grid_position(cx: int, cy: int, side: int) -> str:
    """'top left' ... 'bottom right' on a 3x3 grid of the picture; the very centre cell is 'centre'."""
    row, col = _ROWS[min(2, 3 * cy // side)], _COLS[min(2, 3 * cx // side)]
    return "centre" if (row, col) == ("middle", "middle") else f"{row} {col}"


def _shape_list(scene: Scene, indices: list[int]) -> str:
    objs = sorted((scene.objects[i] for i in indices), key=lambda o: (o.cx, o.cy))
    return ", ".join(("an " if o.shape[0] in "aeiou" else "a ") + o.shape for o in objs) or "none"


def _gold(item: dict, scene: Scene) -> dict:
    """Each step's gold value, in the words of the rationale: the anchor's grid cell, two shape multisets, a count."""
    ops = {s["op"]: s for s in item.get("chain", [])}
    if set(ops) != set(STEPS):
        raise LmstackError(f"multi-step item {item.get('question')!r} has chain ops {sorted(ops)}, "
                           f"expected {list(STEPS)}")
    try:
        anchor = scene.objects[ops["find"]["result"]]
        coloured = [scene.objects[i].shape for i in ops["filter_colour"]["result"]]
        sided = [scene.objects[i].shape for i in ops["filter_relation"]["result"]]
    except (IndexError, TypeError) as e:
        raise LmstackError(f"multi-step item {item.get('question')!r} does not fit its scene: {e}") from None
    return {"find": grid_position(anchor.cx, anchor.cy, scene.size), "filter_colour": Counter(coloured),
            "filter_relation": Counter(sided), "count": int(ops["count"]["result"])}


def rationale(item: dict, scene: Scene) -> str:
    """The chain of `item` in words a picture shows (see the module docstring), without the answer."""
    ops = {s["op"]: s for s in item["chain"]}
    _gold(item, scene)  # validates the chain against the scene
    anchor, colour, rel = item["args"]["anchor"], item["args"]["colour"], item["args"]["relation"]
    a = scene.objects[ops["find"]["result"]]
    return (f"The {anchor} is {grid_position(a.cx, a.cy, scene.size)}. "
            f"The other {colour} shapes: {_shape_list(scene, ops['filter_colour']['result'])}. "
            f"Of those, {rel} the {anchor}: {_shape_list(scene, ops['filter_relation']['result'])}. "
            f"That makes {ops['count']['result']}.")


def target(item: dict, scene: Scene, mode: str) -> str:
    """What a model is trained to write: 'Answer: X' (direct) or the rationale then 'Answer: X'."""
    if mode not in MODES:
        raise LmstackError(f"unknown chain-of-thought mode {mode!r}; allowed: {', '.join(MODES)}")
    answer = f"{ANSWER_PREFIX} {item['answer']}"
    return answer if mode == "direct" else f"{rationale(item, scene)} {answer}"


def prompt(question: str) -> str:
    """The text a model reads after the picture: '<image> Question: ... ' (the target follows it)."""
    return f"{IMAGE_TOKEN} Question: {question}"


def cot_examples(records: list[dict], split: str | None = None, mode: str = "rationale") -> list[dict]:
    """One example per multi-step item of the records (of `split` when given): record id, the item, its
    prompt and its target in `mode`."""
    out = []
    for rec in records:
        if split is not None and rec["split"] != split:
            continue
        scene = Scene.from_dict(rec["scene"])
        for item in rec["multistep"]:
            out.append({"record": rec["id"], "item": item, "prompt": prompt(item["question"]),
                        "target": target(item, scene, mode)})
    return out


_FIND_RE = re.compile(r"The [a-z]+ [a-z]+ is ((?:top|middle|bottom) (?:left|middle|right)|centre)\.")
_COLOUR_RE = re.compile(r"The other [a-z]+ shapes: ([a-z ,]+)\.")
_REL_RE = re.compile(r"Of those, (?:left of|right of|above|below) the [a-z]+ [a-z]+: ([a-z ,]+)\.")
_COUNT_RE = re.compile(r"That makes (\d+)\.")


def parse_answer(text: str) -> str | None:
    """What follows the last 'Answer:' of a generation up to the line's end (a final full stop dropped; a model
    is trained to stop there), or None when there is none: a number, a word, or a name of several words."""
    if ANSWER_PREFIX not in text:
        return None
    return text.rsplit(ANSWER_PREFIX, 1)[1].split("\n", 1)[0].strip().removesuffix(".").strip()


def _parse_shapes(listed: str) -> Counter:
    if listed.strip() == "none":
        return Counter()
    return Counter(part.strip().split(" ", 1)[-1] for part in listed.split(",") if part.strip())


def parse_chain(text: str) -> dict:
    """The value of each step a generated rationale states (a step it does not state is missing)."""
    out: dict = {}
    for step, regex in (("find", _FIND_RE), ("filter_colour", _COLOUR_RE), ("filter_relation", _REL_RE),
                        ("count", _COUNT_RE)):
        m = regex.search(text)
        if m:
            value = m.group(1)
            out[step] = (_parse_shapes(value) if step.startswith("filter") else
                         int(value) if step == "count" else value)
    return out


def score_chain(text: str, item: dict, scene: Scene) -> dict:
    """Score one generation: the answer, whether it is right, each step's verdict (True, False, or None for a
    step not stated) and the first step that is not right (None when all are)."""
    answer = parse_answer(text)
    gold, stated = _gold(item, scene), parse_chain(text)
    steps = {s: (stated[s] == gold[s] if s in stated else None) for s in STEPS}
    first_wrong = next((s for s in STEPS if steps[s] is not True), None)
    return {"answer": answer, "correct": answer == item["answer"], "steps": steps, "first_wrong": first_wrong}


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize(scores: list[dict]) -> dict:
    """Accuracy with its n and stderr; for rationales also each step's accuracy and where chains first go wrong
    (overall, and among the wrong answers)."""
    n = len(scores)
    acc = sum(s["correct"] for s in scores) / n if n else 0.0
    out = {"accuracy": acc, "n": n, "stderr": stderr(acc, n)}
    if any(any(v is not None for v in s["steps"].values()) for s in scores):
        out["step_accuracy"] = {st: sum(s["steps"][st] is True for s in scores) / n for st in STEPS}
        out["first_wrong"] = dict(Counter(s["first_wrong"] or "none" for s in scores))
        out["first_wrong_when_answer_wrong"] = dict(Counter(s["first_wrong"] or "none"
                                                            for s in scores if not s["correct"]))
    return out


__all__ = ["MODES", "STEPS", "ANSWER_PREFIX", "grid_position", "rationale", "target", "prompt", "cot_examples",
           "parse_answer", "parse_chain", "score_chain", "summarize", "stderr"]
