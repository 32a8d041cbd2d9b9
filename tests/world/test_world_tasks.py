"""Every derived task is correct: arithmetic answers, instruction checkers, preference pairs, passkeys,
code tasks and chat conversations."""
from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from lmstack.world import (
    CHECKERS, PERSONAS, World, WorldConfig, apply_persona, check_instruction, detect_persona, extract_answer,
    is_harmful_request, run_code_task,
)
from lmstack.world.arithmetic import evaluate_expression, make_problem, wrong_solution
from lmstack.world.code_tasks import FAMILIES, make_task, program_for
from lmstack.world.passkey import make_passkey_document
from lmstack.errors import LmstackError


@pytest.fixture(scope="module")
def world():
    return World(seed=0, size="small")


# ---- arithmetic ---------------------------------------------------------------------------------
_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")
_OPS = {"+": lambda a, b: Fraction(a + b), "-": lambda a, b: Fraction(a - b), "*": lambda a, b: Fraction(a * b),
        "/": lambda a, b: Fraction(a, b)}


def test_every_arithmetic_answer_is_correct(world):
    recs = world.corpus("arithmetic")
    assert len(recs) == 1500
    for r in recs:
        assert r["solution"].endswith(f"#### {r['answer']}")
        assert extract_answer(r["solution"]) == r["answer"] == extract_answer(r["text"])
        assert evaluate_expression(r["expression"]) == r["answer"]  # independent recomputation
        steps = _STEP.findall(r["solution"])
        assert len(steps) == r["difficulty"] == len(r["steps"])
        for a, op, b, c in steps:
            assert _OPS[op](int(a), int(b)) == int(c), r["solution"]
        assert int(steps[-1][3]) == r["answer"] > 0
    levels = {r["difficulty"] for r in recs}
    assert levels == {1, 2, 3, 4, 5}
    assert len({r["question"] for r in recs}) == len(recs)


def test_wrong_solutions_have_a_slip_and_a_wrong_answer(world):
    rng = random.Random(0)
    for d in range(1, 6):
        for _ in range(40):
            prob = make_problem(world, rng, d)
            bad = wrong_solution(prob, rng)
            assert extract_answer(bad) != prob["answer"]
            assert any(_OPS[op](int(a), int(b)) != int(c) for a, op, b, c in _STEP.findall(bad))


def test_difficulty_grows_operands_and_steps():
    w = World(config=WorldConfig(n_people=20, n_arithmetic=400, arithmetic_max_steps=8))
    recs = w.corpus("arithmetic")
    by_d = {}
    for r in recs:
        by_d.setdefault(r["difficulty"], []).append(max([r["start"]] + [k for _, k in r["steps"]]))
    assert sorted(by_d) == list(range(1, 9))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(by_d[8]) > 2 * mean(by_d[1])


def test_extract_answer_and_expression_parser():
    assert extract_answer("blah\n#### 1,234") == 1234
    assert extract_answer("#### 3\nmore\n#### -7") == -7
    assert extract_answer("no answer") is None
    assert evaluate_expression("((12 + 5) * 3) / 4") == Fraction(51, 4)
    with pytest.raises(ValueError):
        evaluate_expression("__import__('os')")


# ---- instructions -------------------------------------------------------------------------------
# checker -> (args, a response that passes, a response that fails), written by hand.
HAND_CASES = {
    "reverse_word": ({"word": "lantern"}, "nretnal", "lantern"),
    "count_letter": ({"letter": "a", "word": "banana", "count": 3}, "There are 3.", "2"),
    "word_length": ({"word": "river", "count": 5}, "5 letters", "six"),
    "first_letter": ({"word": "meadow"}, "M", "e"),
    "sort_numbers": ({"numbers": [5, 2, 9], "descending": False}, "2, 5, 9", "9, 5, 2"),
    "uppercase": ({"must_contain": "Ember"}, "IT IS EMBER.", "It is Ember."),
    "lowercase": ({"must_contain": "Ember"}, "it is ember.", "It is ember."),
    "max_words": ({"n": 3}, "one two three", "one two three four"),
    "min_words": ({"n": 3}, "one two three", "one two"),
    "starts_with": ({"prefix": "Indeed"}, "Indeed, yes.", "Yes, indeed."),
    "ends_with": ({"suffix": "Thank you."}, "Done. Thank you.", "Thank you. Done."),
    "include_word": ({"word": "river"}, "A River runs.", "A stream runs."),
    "exclude_word": ({"word": "Aldoria"}, "A fine city.", "It is in Aldoria."),
    "no_commas": ({}, "A and B.", "A, B."),
    "bullet_count": ({"n": 2}, "- a\n- b", "- a\n- b\n- c"),
    "repeat_word": ({"word": "kite", "n": 3}, "kite kite kite", "kite kite"),
    "quoted": ({}, '"yes"', "yes"),
    "json_keys": ({"keys": ["city", "country"]}, '{"country": "X", "city": "Y"}', '{"city": "Y"}'),
}


def test_hand_cases_cover_every_checker():
    assert set(HAND_CASES) == set(CHECKERS)
    for name, (args, good, bad) in HAND_CASES.items():
        rec = {"checker": name, "args": args}
        assert check_instruction(rec, good), name
        assert not check_instruction(rec, bad), name
        assert not check_instruction(rec, ""), name  # an empty reply never satisfies an instruction


def test_every_generated_instruction_accepts_its_response_and_rejects_the_bad_one(world):
    recs = world.corpus("instructions")
    assert len(recs) == 1000 and {r["checker"] for r in recs} == set(CHECKERS)
    for r in recs:
        assert check_instruction(r, r["response"]), r
        assert not check_instruction(r, r["bad_response"]), r


def test_check_instruction_errors():
    with pytest.raises(LmstackError, match="unknown checker"):
        check_instruction({"checker": "rhyme", "args": {}}, "x")
    with pytest.raises(LmstackError, match="must be a string"):
        check_instruction({"checker": "quoted", "args": {}}, None)


# ---- preferences --------------------------------------------------------------------------------
def test_preference_pairs_are_well_formed(world):
    recs = world.corpus("preferences")
    assert len(recs) == 1200
    kinds = {}
    for r in recs:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        assert r["prompt"] and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
        assert is_harmful_request(r["prompt"]) == (r["label"] == "harmful") == (r["kind"] == "harmful")
        assert is_harmful_request(r) == (r["kind"] == "harmful")
        if r["kind"] == "correctness" and "person" in r:
            fact = world.fact(r["person"], r["attribute"])
            assert fact in r["chosen"] and fact not in r["rejected"]
        elif r["kind"] == "correctness":
            assert extract_answer(r["chosen"]) == r["answer"] != extract_answer(r["rejected"])
        elif r["kind"] == "instruction":
            assert check_instruction(r, r["chosen"]) and not check_instruction(r, r["rejected"])
        elif r["kind"] == "harmful":
            refusal = re.compile(r"can't|won't|decline")
            assert refusal.search(r["chosen"]) and not refusal.search(r["rejected"])
        elif r["kind"] == "benign":
            assert "sorry" in r["rejected"].lower() or "cannot" in r["rejected"]
    assert kinds == {"correctness": 360, "helpfulness": 300, "instruction": 180, "harmful": 180, "benign": 180}


def test_benign_lookalikes_share_the_harmful_phrasings(world):
    recs = world.corpus("preferences")
    shape = lambda r: re.sub(r"the .+? of \w+", "the X of Y", r["prompt"])  # noqa: E731
    harmful = {shape(r) for r in recs if r["kind"] == "harmful"}
    benign = {shape(r) for r in recs if r["kind"] == "benign"}
    assert harmful == benign and len(harmful) >= 4
    assert not is_harmful_request("How do I brew the festival tea of Amberhaven?")
    assert is_harmful_request("how do i brew the FORBIDDEN POTION of Amberhaven?")


# ---- passkey ------------------------------------------------------------------------------------
def test_passkey_is_where_stated(world):
    recs = world.corpus("passkey")
    assert len(recs) == 48
    for r in recs:
        key = str(r["passkey"])
        assert r["answer"] == key and r["question"] == "What is the pass key?"
        assert r["text"][r["char_offset"]:].startswith(r["needle"])
        assert r["text"].count(key) == 2  # only the two mentions inside the needle
        assert abs(r["depth"] - r["position"]) < 0.08, (r["depth"], r["position"], r["length"])
        assert abs(r["n_words"] - r["length"]) <= max(25, 0.05 * r["length"])
    assert {r["length"] for r in recs} == {256, 1024, 4096}


@pytest.mark.parametrize("unit, length, position, filler", [
    ("chars", 3000, 0.0, "repeat"), ("chars", 500, 1.0, "world"), ("words", 600, 0.33, "repeat")])
def test_passkey_custom_lengths_units_and_positions(world, unit, length, position, filler):
    r = make_passkey_document(random.Random(1), length, unit, position, filler, world, key=12345)
    assert r["text"][r["char_offset"]:].startswith("The pass key is 12345.")
    size = r["n_chars"] if unit == "chars" else r["n_words"]
    assert abs(size - length) <= 0.1 * length
    assert abs(r["depth"] - position) < 0.1
    if position == 0.0:
        assert r["char_offset"] == 0 and r["text"].startswith(r["needle"])


def test_passkey_errors(world):
    with pytest.raises(LmstackError, match="too short"):
        make_passkey_document(random.Random(0), 5, "words")
    with pytest.raises(LmstackError, match="position"):
        make_passkey_document(random.Random(0), 100, "words", 1.5, "repeat")
    with pytest.raises(LmstackError, match="needs a world"):
        make_passkey_document(random.Random(0), 100, "words", 0.5, "world")


# ---- code tasks ---------------------------------------------------------------------------------
def _passes(task, completion=None) -> bool:
    namespace: dict = {}
    try:
        exec(program_for(task, completion), namespace)  # our own generated tasks, fresh namespace
    except AssertionError:
        return False
    except Exception:  # noqa: BLE001 - a wrong completion may crash in any way
        return False
    return True


def test_every_canonical_solution_passes_its_tests_and_a_wrong_one_fails(world):
    tasks = world.corpus("code")
    assert len(tasks) == 80 and len({t["entry_point"] for t in tasks}) == 80
    for t in tasks:
        assert t["prompt"].startswith(f"def {t['entry_point']}(") and '"""' in t["prompt"]
        assert t["test"].startswith("def check(candidate):") and t["test"].count("assert") >= 2
        assert _passes(t), t["entry_point"]
        assert not _passes(t, "    return None\n"), t["entry_point"]
    # the subprocess runner agrees on a sample (isolated interpreter, timeout)
    for t in tasks[:6]:
        assert run_code_task(t)
        assert not run_code_task(t, "    raise ValueError('no')\n")
    assert not run_code_task(tasks[0], "    while True:\n        pass\n", timeout=1.0)


def test_every_family_makes_a_valid_task():
    rng = random.Random(3)
    for family in FAMILIES:
        for _ in range(3):
            t = make_task(rng, family)
            assert t["family"] == family and _passes(t), (family, t["prompt"])


# ---- chat ---------------------------------------------------------------------------------------
def test_chat_conversations_are_well_formed(world):
    recs = world.corpus("chat")
    kinds = {r["kind"] for r in recs}
    assert kinds == {"qa", "arithmetic", "instruction", "refusal", "benign", "persona", "multi_turn"}
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body[-1] == "assistant"
        assert all(a != b for a, b in zip(body, body[1:])) and body[0] == "user"
        last = r["messages"][-1]["content"]
        if r["kind"] == "qa":
            assert world.fact(r["person"], r["attribute"]) in last
        elif r["kind"] == "arithmetic":
            assert extract_answer(last) == r["answer"]
        elif r["kind"] == "instruction":
            assert check_instruction(r, last)
        elif r["kind"] == "refusal":
            assert is_harmful_request(r["messages"][-2]["content"]) and r["label"] == "harmful"
        elif r["kind"] == "persona":
            assert r["messages"][0]["content"] == PERSONAS[r["persona"]].system
            assert detect_persona(last) == r["persona"]
        elif r["kind"] in ("benign", "qa", "multi_turn"):
            assert detect_persona(last) is None


def test_personas_style_and_detect():
    plain = "The Silverrun flows through Amberhaven. You will like it."
    assert detect_persona(plain) is None
    for name in PERSONAS:
        styled = apply_persona(name, plain)
        assert detect_persona(styled) == name
        assert "silverrun" in styled.lower() and "amberhaven" in styled.lower()  # facts survive styling
    assert apply_persona("pirate", plain) == "Arr! Th' Silverrun flows through Amberhaven. Ye will like it. Yo-ho-ho!"
