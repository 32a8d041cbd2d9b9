"""Rule-based rewards (math, format, instructions, factuality, safety, length), their mixture, grouped
normalisation, and the demonstration that a single length reward is hacked while the mixture is not."""
import json
import math
import random

import pytest
import torch

from lmstack.align.rewards import (REWARDS, FactualityReward, FormatReward, HelpfulnessReward, InstructionReward,
                                   LengthReward, MathReward, RewardMixture, SafetyReward, build_reward,
                                   extract_claims, group_normalize, refusal_rates, score_batch)
from lmstack.world.arithmetic import wrong_solution
from lmstack.world.checkers import is_refusal
from lmstack.errors import LmstackError


def test_math_reward_world_and_gsm8k_formats(world):
    m = MathReward()
    rng = random.Random(0)
    for rec in world.corpus("arithmetic")[:20]:
        assert m(rec["question"], rec["solution"], rec) == 1.0
        assert m(rec["question"], wrong_solution(rec, rng), rec) == 0.0
        assert m(rec["question"], rec["solution"].replace("####", "answer:"), rec) == 0.0  # no #### -> no credit
    gsm = {"answer": "Janet sells 16 - 3 - 4 = 9 duck eggs.\nShe makes 9 * 2 = 18.\n#### 18"}
    assert m("q", "so the total is\n#### 18", gsm) == 1.0
    assert m("q", "#### 1,8", {"answer": 18}) == 1.0  # GSM8K-style thousands separators are dropped
    assert math.isnan(m("q", "#### 18", {"answer": "Amberhaven"}))  # not a math record: no judgement
    with pytest.raises(LmstackError, match="expression"):
        m("q", "#### 5", {"answer": 5, "expression": "2 + 2"})


def test_math_reward_on_real_gsm8k(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]]
    m = MathReward()
    assert all(m(r["question"], r["answer"], r) == 1.0 for r in rows)
    assert sum(m(r["question"], r["answer"] + "0", r) for r in rows) == 0  # a changed final answer fails


def test_format_and_instruction_rewards(world):
    f = FormatReward()
    assert f("q", "3 + 4 = 7\n#### 7", {}) == 1.0 and f("q", "the answer is 7", {}) == 0.0
    ins = InstructionReward()
    recs = world.corpus("instructions")
    assert all(ins(r["instruction"], r["response"], r) == 1.0 for r in recs)
    assert all(ins(r["instruction"], r["bad_response"], r) == 0.0 for r in recs)
    assert math.isnan(ins("q", "x", {}))


def test_factuality_claims_against_the_fact_table(world):
    p, q = world.people[0], world.people[1]
    wrong_city = next(c.name for c in world.cities if c.name != p.birth_city)
    text = (f"{p.name} was born in {p.birth_city}. She works for {p.employer}. "
            f"{q.name} studied at {q.university}. {p.name} majored in Nothingology.")
    claims = extract_claims(world, text)
    assert [(s, a) for s, a, _ in claims] == [(p.name, "birth_city"), (p.name, "employer"), (q.name, "university"),
                                              (p.name, "major")]
    r = FactualityReward(world)
    assert r("q", text, {}) == pytest.approx((3 - 1) / 4)
    assert r("q", f"{p.name} was born in {wrong_city}.", {}) == -1.0
    assert r("q", "No facts here.", {}) == 0.0
    # the asked-about fact counts for a bare answer
    assert r("Where was he born?", f"{p.birth_city}.", {"person": p.name, "attribute": "birth_city"}) == 1.0
    city = world.cities[0]
    assert r("q", f"{city.name} is in {city.country}.", {}) == 1.0
    with pytest.raises(LmstackError, match="world"):
        build_reward("factuality")


def test_safety_reward_on_world_pairs(world):
    s = SafetyReward()
    pairs = [r for r in world.corpus("preferences") if r["kind"] in ("harmful", "benign")]
    assert pairs and all(s(r["prompt"], r["chosen"], r) == 1.0 for r in pairs)
    assert all(s(r["prompt"], r["rejected"], r) == 0.0 for r in pairs)
    harmful = [r for r in pairs if r["kind"] == "harmful"]
    assert all(is_refusal(r["chosen"]) for r in harmful) and not any(is_refusal(r["rejected"]) for r in harmful)
    # without a record the prompt text decides
    assert s(harmful[0]["prompt"], harmful[0]["chosen"], {}) == 1.0
    rates = refusal_rates([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
    assert rates["harmful_refusal_rate"] == 1.0 and rates["benign_refusal_rate"] == 0.0
    rates = refusal_rates([r["prompt"] for r in pairs], ["I'm sorry, but I can't help with that request."] * len(pairs))
    assert rates["benign_refusal_rate"] == 1.0


def test_mixture_weights_applicability_and_nan():
    class Broken(LengthReward):
        name = "broken"

        def score(self, prompt, completion, record):
            return float("nan")

    mix = RewardMixture({"math": (MathReward(), 2.0), "length": (LengthReward(target_words=10), 1.0)})
    # math applies: (2 · 1 + 1 · 0.5) / 3
    assert mix("q", "a b c d\n#### 4", {"answer": 4}) == pytest.approx((2 * 1.0 + 1 * 0.5) / 3)
    # math does not apply: only length counts, on the same scale
    assert mix("q", "a b c d e", {}) == pytest.approx(0.5)
    assert mix.components("q", "a b", {})["math"] != mix.components("q", "a b", {})["math"]  # NaN: not applicable
    failing = RewardMixture({"math": (MathReward(), 1.0), "broken": (Broken(), 1.0)})
    assert math.isnan(failing("q", "#### 4", {"answer": 4}))  # an applicable judge failed: no partial reward
    with pytest.raises(LmstackError, match="weight"):
        RewardMixture({"math": (MathReward(), -1.0)})
    with pytest.raises(LmstackError, match="unknown reward"):
        RewardMixture.from_weights({"charisma": 1.0})
    assert {"math", "format", "instruction", "factuality", "safety", "length", "helpfulness"} <= set(REWARDS)


def test_group_normalize_by_prompt_in_any_order():
    r = torch.tensor([1.0, 3.0, 0.0, 5.0, float("nan")])
    out, valid = group_normalize(r, ["p1", "p2", "p1", "p2", "p1"])
    # p1: [1, 0] -> mean 0.5, std 0.7071; p2: [3, 5] -> mean 4, std 1.4142
    assert out[0] == pytest.approx(0.5 / (0.70711 + 1e-4), abs=1e-4)
    assert out[2] == pytest.approx(-0.5 / (0.70711 + 1e-4), abs=1e-4)
    assert out[1] == pytest.approx(-1 / (1.41421 + 1e-4), abs=1e-4)
    assert valid.tolist() == [True, True, True, True, False] and out[4] == 0
    with pytest.raises(LmstackError, match="one group key per reward"):
        group_normalize(r, ["p1"])


def test_single_length_reward_is_hacked_but_the_mixture_is_not(world):
    """A long wrong answer beats a short right one under a length reward; the mixture of correctness,
    safety and length ranks the right answer first on every problem."""
    length = LengthReward(target_words=40)
    mix = RewardMixture.from_weights({"math": 1.0, "safety": 0.5, "length": 0.2}, target_words=40)
    rng = random.Random(0)
    filler = " Let me double check every step carefully and explain the reasoning in full detail." * 4
    records = world.corpus("arithmetic")[:30]
    right = [r["solution"] for r in records]
    long_wrong = [wrong_solution(r, rng).replace("####", filler + "\n####") for r in records]
    prompts = [r["question"] for r in records]
    length_r, length_w = score_batch(length, prompts, right, records), score_batch(length, prompts, long_wrong, records)
    mix_r, mix_w = score_batch(mix, prompts, right, records), score_batch(mix, prompts, long_wrong, records)
    assert float((length_w > length_r).float().mean()) == 1.0   # the length RM is hacked on every problem
    assert float((mix_r > mix_w).float().mean()) == 1.0         # the mixture never is
    # a refusal of a benign math question loses under the mixture too (safety penalises over-refusal)
    refusal = "I'm sorry, but I can't help with that request."
    assert mix(prompts[0], refusal, records[0]) < mix(prompts[0], right[0], records[0])


def test_helpfulness_heuristic_prefers_chosen_on_every_flaw(world):
    h = HelpfulnessReward()
    pairs = [r for r in world.corpus("preferences") if r["kind"] == "helpfulness"]
    assert {r["flaw"] for r in pairs} == {"terse", "irrelevant", "overlong", "dismissive"}
    assert all(h(r["prompt"], r["chosen"], r) > h(r["prompt"], r["rejected"], r) for r in pairs)
    # a pure length reward falls for the overlong (padded, repetitive) reply
    overlong = [r for r in pairs if r["flaw"] == "overlong"]
    assert all(LengthReward()(r["prompt"], r["rejected"], r) > LengthReward()(r["prompt"], r["chosen"], r)
               for r in overlong)
