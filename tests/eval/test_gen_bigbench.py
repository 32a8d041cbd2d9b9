"""BIG-bench JSON tasks: real-format files load and score; the shipped synthetic-world tasks are reproducible."""
from __future__ import annotations

import json

import pytest

from lmstack.errors import LmstackError
from lmstack.eval import evaluate, get_task
from lmstack.eval.tasks.bigbench import SHIPPED_DIR, WORLD_TASKS, write_world_bigbench

MC_TASK = {
    "name": "tiny_logic", "description": "toy", "keywords": ["logical reasoning"],
    "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade",
    "task_prefix": "Answer the riddles.\n",
    "examples": [
        {"input": "Is fire hot?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Is ice hot?", "target_scores": {"yes": 0, "no": 1}},
        {"input": "Is snow cold?", "target_scores": {"yes": 1, "no": 0}},
    ],
}
GEN_TASK = {
    "name": "tiny_math", "metrics": ["exact_str_match"], "example_input_prefix": "\nQuestion: ",
    "example_output_prefix": "\nAnswer: ", "output_regex": r"-?\d+",
    "examples": [
        {"input": "2 + 2", "target": "4"},
        {"input": "3 + 3", "target": ["6", "six"]},
        {"input": "3 + 3", "target": "6"},                  # a duplicate input: BIG-bench drops it
    ],
}


def _write(tmp_path, spec, name="task.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return str(path)


def test_multiple_choice_task_prompt_and_grade(tmp_path, fake_lm_factory):
    task = get_task("bigbench", path=_write(tmp_path, MC_TASK))
    doc = task.cached_docs("test")[0]
    text = task.fewshot_context(doc, num_fewshot=0)
    assert text.startswith("Answer the riddles.\n\nQ: Is fire hot?\n  choice: ")
    assert text.endswith("\nA: ") and "\n  choice: yes" in text and "\n  choice: no" in text

    def ll(ctx, cont):  # a model that always prefers "yes"
        return -1.0 if cont == "yes" else -2.0

    out = evaluate(fake_lm_factory(loglikelihood=ll), [task], progress=False, bootstrap_iters=0)
    entry = out["results"]["bigbench"]
    assert entry["metrics"]["multiple_choice_grade"] == pytest.approx(2 / 3)
    assert entry["chance"] == 0.5


def test_generative_task_with_output_regex_and_target_lists(tmp_path, fake_lm_factory):
    task = get_task("bigbench", path=_write(tmp_path, GEN_TASK))
    assert len(task.cached_docs("test")) == 2
    answers = {"2 + 2": "The sum is 4.", "3 + 3": "six, I mean 6"}
    lm = fake_lm_factory(generate=lambda c, a: answers[c.rsplit("Question: ", 1)[-1].split("\n")[0]])
    out = evaluate(lm, [task], num_fewshot=1, progress=False, bootstrap_iters=0)
    assert out["results"]["bigbench"]["metrics"]["exact_str_match"] == 1.0
    ctx = lm.calls[0][1]
    assert ctx.count("\nQuestion: ") == 2 and ctx.endswith("\nAnswer: ")   # one shot + the item
    assert all(call[2].until == ["\n"] for call in lm.calls)


def test_both_metrics_from_one_file(tmp_path, fake_lm_factory):
    spec = {"metrics": ["multiple_choice_grade", "exact_str_match"],
            "examples": [{"input": "Capital of Ostrelia?", "target": "Amberhaven",
                          "target_scores": {"Amberhaven": 1, "Slatemoor": 0}}]}
    task = get_task("bigbench", path=_write(tmp_path, spec))
    lm = fake_lm_factory(loglikelihood=lambda c, x: -1.0 if x == "Slatemoor" else -3.0,
                         generate=lambda c, a: "Amberhaven")
    m = evaluate(lm, [task], progress=False, bootstrap_iters=0)["results"]["bigbench"]["metrics"]
    assert m["multiple_choice_grade"] == 0.0 and m["exact_str_match"] == 1.0


@pytest.mark.parametrize("spec,match", [
    ({"metrics": ["exact_str_match"]}, "examples"),
    ({"metrics": ["bleu"], "examples": [{"input": "a", "target": "b"}]}, "supported"),
    ({"metrics": ["exact_str_match"], "examples": [{"target": "b"}]}, "input"),
    ({"metrics": ["multiple_choice_grade"], "examples": [{"input": "a", "target": "b"}]}, "targets"),
])
def test_malformed_task_files_are_clear_errors(tmp_path, spec, match):
    with pytest.raises(LmstackError, match=match):
        get_task("bigbench", path=_write(tmp_path, spec))


def test_missing_path_and_bad_json(tmp_path, fake_lm_factory):
    with pytest.raises(LmstackError, match="path="):
        get_task("bigbench")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmstackError, match="not a valid"):
        get_task("bigbench", path=str(bad))


def test_shipped_world_tasks_are_reproducible_and_small(tmp_path):
    paths = write_world_bigbench(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{n}.json" for n in WORLD_TASKS)
    total = 0
    for p in paths:
        shipped = SHIPPED_DIR / p.name
        assert json.loads(shipped.read_text()) == json.loads(p.read_text()), f"{p.name}: rerun write_world_bigbench"
        total += shipped.stat().st_size
    assert total < 200_000


@pytest.mark.parametrize("name", sorted(WORLD_TASKS))
def test_shipped_world_tasks_score_a_truthful_model_perfectly(name, fake_lm_factory):
    from lmstack.world import World

    task = get_task(f"bigbench_{name}")
    docs = task.cached_docs("test")
    assert len(docs) >= 100
    world = World(seed=0, size="small")
    gold = {d["input"]: task.targets(d)[0] for d in docs}

    def q(ctx):
        return ctx.rsplit("\nQ: ", 1)[-1].split("\n")[0]

    lm = fake_lm_factory(loglikelihood=lambda c, x: 0.0 if x == gold[q(c)] else -5.0,
                         generate=lambda c, a: gold[q(c)])
    out = evaluate(lm, [task], limit=30, num_fewshot=2, progress=False, bootstrap_iters=0)
    metric = task.default_metrics[0]
    assert out["results"][f"bigbench_{name}"]["metrics"][metric] == 1.0
    if name == "world_river":  # the facts really are the world's
        d = docs[0]
        person = d["input"].split("where ")[1].split(" was born")[0]
        assert gold[d["input"]] == world.city(world.person(person).birth_city).river
