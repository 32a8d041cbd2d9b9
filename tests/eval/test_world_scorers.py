"""One harness for world tasks: the eval tasks' per-reply scorers are what they score with, and what the SFT and
alignment stages score with."""
from __future__ import annotations

import random

import pytest

from lmstack.eval import get_task
from lmstack.eval.tasks.world import arithmetic_correct, instruction_followed, qa_correct
from lmstack.world import World


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_people=40)


def _replies(docs, field):
    """Each doc's own (right) reply, and another doc's reply (mostly wrong)."""
    rng = random.Random(0)
    own = [str(d[field]) for d in docs]
    return [(d, r) for d, r in zip(docs, own)] + [(d, own[rng.randrange(len(own))]) for d in docs]


def test_qa_correct_is_world_qas_contains_fact_and_the_worlds_fact(world):
    task = get_task("world_qa")
    docs = world.corpus("qa", split="test")
    for d in docs:  # the record's answer is the world's fact, so reading it needs no World
        assert d["answer"] == world.fact(d["person"], d["attribute"])
    for d, reply in _replies(docs, "answer"):
        assert qa_correct(d, reply) == world.is_correct(d["person"], d["attribute"], reply)
        assert float(qa_correct(d, reply)) == task.process_results(d, [reply])["contains_fact"]
    assert qa_correct({"answer": "Amberhaven"}, "born in amberhaven.")
    assert not qa_correct({"answer": "Amberhaven"}, "born in Amberhavenport")


def test_arithmetic_correct_is_world_arithmetics_strict_match(world):
    task = get_task("world_arithmetic")
    docs = world.corpus("arithmetic", split="test")
    pairs = _replies(docs, "solution") + [(d, d["solution"] + "\n\nNext: 1 + 1 = 2\n#### 2") for d in docs]
    assert any(arithmetic_correct(d, r) for d, r in pairs) and not all(arithmetic_correct(d, r) for d, r in pairs)
    for d, reply in pairs:
        assert float(arithmetic_correct(d, reply)) == task.process_results(d, [reply])["exact_match_strict"]


def test_instruction_followed_is_world_ifevals_strict_check(world):
    task = get_task("world_ifeval", extra=0)
    docs = task.docs("test")
    pairs = _replies(docs, "response") + _replies(docs, "bad_response")
    assert any(instruction_followed(d, r) for d, r in pairs) and not all(instruction_followed(d, r) for d, r in pairs)
    for d, reply in pairs:
        assert float(instruction_followed(d, reply)) == task.process_results(d, [reply])["prompt_level_strict_acc"]


def test_the_sft_stage_scores_with_the_eval_scorers(world):
    from lmstack.stages.sft import TASKS

    chat = world.corpus("chat", split="test")
    scorer = {"qa": lambda d, r: qa_correct(d, r.split("\n")[0]), "arithmetic": arithmetic_correct,
              "instruction": lambda d, r: instruction_followed(d, r.split("\n\n")[0].strip())}
    for task, (kind, _, ok) in TASKS.items():
        docs = [r for r in chat if r["kind"] == kind]
        replies = [r["messages"][-1]["content"] for r in docs]
        rng = random.Random(1)
        pairs = [(d, r) for d, r in zip(docs, replies)] + [(d, replies[rng.randrange(len(docs))]) for d in docs]
        results = [ok(d, r) for d, r in pairs]
        assert any(results) and not all(results), task
        assert results == [scorer[task](d, r) for d, r in pairs], task
