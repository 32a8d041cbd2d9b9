"""Multimodal chain-of-thought: the rationale says each gold step in words the picture shows, parses back to
all-correct steps, and a rationale broken at one step is caught at exactly that step."""
from __future__ import annotations

import pytest

from lmstack.errors import LmstackError
from lmstack.multimodal.cot import STEPS, cot_examples, grid_position, parse_answer, parse_chain, score_chain, \
    summarize, target
from lmstack.multimodal.shapes import Scene
from lmstack.multimodal.vision_world import build_vision_world


@pytest.fixture(scope="module")
def records():
    return build_vision_world(60, 64, seed=0)


@pytest.fixture(scope="module")
def examples(records):
    by_id = {r["id"]: r for r in records}
    out = cot_examples(records, mode="rationale")
    assert len(out) == sum(len(r["multistep"]) for r in records) > 20
    return [(e, Scene.from_dict(by_id[e["record"]]["scene"])) for e in out]


def _our_count(item, scene):
    """The answer re-derived here from the scene: objects of the colour, other than the anchor, on the side."""
    colour, rel = item["args"]["colour"], item["args"]["relation"]
    anchor = next(o for o in scene.objects if f"{o.colour} {o.shape}" == item["args"]["anchor"])
    side = {"left of": lambda o: o.cx < anchor.cx, "right of": lambda o: o.cx > anchor.cx,
            "above": lambda o: o.cy < anchor.cy, "below": lambda o: o.cy > anchor.cy}[rel]
    return sum(1 for o in scene.objects if o is not anchor and o.colour == colour and side(o))


def test_gold_rationale_scores_right_at_every_step(examples):
    for ex, scene in examples:
        out = score_chain(ex["target"], ex["item"], scene)
        assert out == {"answer": ex["item"]["answer"], "correct": True, "steps": dict.fromkeys(STEPS, True),
                       "first_wrong": None}
        assert parse_chain(ex["target"])["count"] == _our_count(ex["item"], scene) == int(ex["item"]["answer"])
        assert ex["prompt"].startswith("<image> Question: ") and ex["item"]["question"] in ex["prompt"]


def test_a_broken_step_is_the_first_wrong_one(examples):
    ex, scene = next((e, s) for e, s in examples if parse_chain(e["target"])["filter_colour"])
    text = ex["target"]
    colour_clause = text.split("The other ")[1].split(".")[0]
    broken = text.replace(colour_clause, colour_clause.split(":")[0] + ": none")
    out = score_chain(broken, ex["item"], scene)
    assert out["steps"]["find"] is True and out["steps"]["filter_colour"] is False
    assert out["first_wrong"] == "filter_colour" and out["correct"]  # right answer, wrong reasoning
    # a wrong anchor position is caught at the first step
    pos = text.split(" is ")[1].split(".")[0]
    other = "bottom right" if pos != "bottom right" else "top left"
    assert score_chain(text.replace(f" is {pos}.", f" is {other}.", 1), ex["item"], scene)["first_wrong"] == "find"
    # a chain with its count missing: the step is None, not False, and it is where the chain stops being right
    cut = text.split(" That makes")[0] + " Answer: 7"
    out = score_chain(cut, ex["item"], scene)
    assert out["steps"]["count"] is None and out["first_wrong"] == "count" and not out["correct"]


def test_direct_mode_and_answer_parsing(records):
    direct = cot_examples(records, split="train", mode="direct")
    assert direct and all(e["target"] == f"Answer: {e['item']['answer']}" for e in direct)
    assert {e["record"] for e in direct} <= {r["id"] for r in records if r["split"] == "train"}
    assert parse_answer("blah Answer: 2 then Answer: 3") == "3"
    assert parse_answer("no answer here") is None


def test_summary_counts_where_chains_go_wrong(examples):
    (ex1, s1), (ex2, s2) = examples[0], examples[1]
    right = score_chain(ex1["target"], ex1["item"], s1)
    wrong = score_chain("The red circle is centre. Answer: 9", ex2["item"], s2)
    summary = summarize([right, wrong])
    assert summary["n"] == 2 and summary["accuracy"] == 0.5 and summary["stderr"] == pytest.approx(0.3535, abs=1e-3)
    assert summary["first_wrong"]["none"] == 1
    assert sum(summary["first_wrong_when_answer_wrong"].values()) == 1
    direct_only = summarize([score_chain("Answer: 0", ex1["item"], s1)])
    assert "step_accuracy" not in direct_only


def test_grid_and_bad_input():
    assert grid_position(5, 5, 64) == "top left" and grid_position(32, 32, 64) == "centre"
    assert grid_position(63, 63, 64) == "bottom right"
    with pytest.raises(LmstackError, match="mode"):
        target({"answer": "1", "chain": []}, Scene(64), "socratic")
    with pytest.raises(LmstackError, match="chain ops"):
        score_chain("Answer: 1", {"question": "q", "answer": "1", "chain": []}, Scene(64))
