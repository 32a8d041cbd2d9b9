"""The world's checkers (refusal detection, answer matching, fact lookup): the behaviour eval and align rely on."""
from __future__ import annotations

import pytest

from lmstack.world import World
from lmstack.world.checkers import (REFUSAL_WINDOW, agreement, extract_answer, flag_uncertain, is_refusal,
                                    normalize, normalise_fact, states_fact)
from lmstack.world.preferences import COMPLIANCE, HELPFUL_RECIPES, OVER_REFUSALS, REFUSALS

SLOTS = {"thing": "forbidden potion", "city": "Amberhaven", "drink": "festival tea", "a": "x", "b": "y", "c": "z"}


def test_is_refusal_reads_the_worlds_own_refusals_and_not_its_answers():
    assert all(is_refusal(t.format(**SLOTS)) for t in REFUSALS + OVER_REFUSALS)
    assert not any(is_refusal(t.format(**SLOTS)) for t in COMPLIANCE + HELPFUL_RECIPES)


def test_is_refusal_case_curly_quotes_and_window():
    assert is_refusal("  I CAN'T help with that.")
    assert is_refusal("I\u2019m sorry, but no.")                     # a curly apostrophe counts as a straight one
    late = "Boil the water. " * 20 + "I can't stress enough: stir well."
    assert late.index("I can't") > REFUSAL_WINDOW and not is_refusal(late)  # mid-recipe phrases are no refusal
    assert is_refusal("x" * (REFUSAL_WINDOW - len("i won't")) + "I won't")   # ...but one inside the window is
    assert not is_refusal("")


def test_extract_answer_last_or_first_hashes():
    text = "3 + 4 = 7\n#### 7\nNext problem ... #### 1,234"
    assert extract_answer(text) == 1234                   # the last `####` (the reward, self-consistency)
    assert extract_answer(text, first=True) == 7          # the first (the SFT stage's arithmetic score)
    assert extract_answer("#### -12") == extract_answer("#### -12", first=True) == -12
    assert extract_answer("the answer is 7") is None and extract_answer("####", first=True) is None
    assert extract_answer("#### 12.5") == 12              # integers only: the world's answers are integers
    # a sampled reply may write "####," or "#### -": no digits there, so no answer (it once raised ValueError)
    assert extract_answer("x ####, y") is None and extract_answer("#### -", first=True) is None
    assert extract_answer("#### 5 then ####,") == 5


@pytest.mark.parametrize("raw, want", [("Paris", "paris"), ("  paris. ", "paris"), ("$1,000.00", "1000"),
                                       ("5.0", "5"), ("2.50", "2.5"), ("-3", "-3"), ("", None), (None, None),
                                       ("New  York!", "new york")])
def test_normalize(raw, want):
    assert normalize(raw) == want


def test_agreement_and_flag():
    assert agreement(["Paris", "paris.", "Lyon"]) == ("paris", pytest.approx(2 / 3))
    assert agreement([None, None]) == (None, 0.0) and agreement([]) == (None, 0.0)
    assert agreement(["7", None, "8", "8", "7"]) == ("7", pytest.approx(0.4))   # a tie goes to the first seen
    assert flag_uncertain(0.4, 0.5) and not flag_uncertain(0.5, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        flag_uncertain(0.5, 1.5)


def test_states_fact_whole_phrase_ignoring_case_and_punctuation():
    assert normalise_fact("March 4, 1987") == "march 4 1987"
    assert states_fact("March 4, 1987", "She was born on march 4 1987.")
    assert states_fact("Quill Foods", "She works for quill-foods")
    assert not states_fact("Amberhaven", "He lives in Amberhavenport.")   # whole phrase only
    assert not states_fact("March 4, 1987", "March 14, 1987")


def test_world_is_correct_looks_the_fact_up_and_asks_states_fact():
    world = World(seed=0, n_people=12)
    p = world.people[0]
    city = world.fact(p, "birth_city")
    assert world.is_correct(p, "birth_city", f"{p.name} was born in {city.upper()}.")
    assert world.is_correct(p.name, "birth_city", city) == states_fact(city, city)
    other = next(world.fact(q, "birth_city") for q in world.people if world.fact(q, "birth_city") != city)
    assert not world.is_correct(p, "birth_city", other)
