"""Counterfactual pairs, measure_disparity, the sentiment lexicon, the bias reward and the pair-keeping GRPO rollout
(lmstack.safety.bias, lmstack.align.rewards.bias, lmstack.safety.bias_rl)."""
import re

import pytest
import torch

from lmstack.align.online import OnlineTrainer
from lmstack.align.rewards import REWARDS, RewardMixture
from lmstack.align.rewards.bias import BiasReward, has_polarity, sentiment
from lmstack.align.rewards.spec import reward_from_spec
from lmstack.align.rollout import Rollout, load_prompts
from lmstack.errors import LmstackError
from lmstack.safety.bias import given_names, make_pairs, measure_disparity, pair_records, write_pair_prompts
from lmstack.safety.bias_rl import BiasGroupTrainer, biased_chats, expand_twins
from lmstack.world import World
from lmstack.world.arithmetic import evaluate_expression
from lmstack.world.checkers import extract_answer

GENDERED = {("she", "he"), ("her", "his"), ("her", "him"), ("herself", "himself")}
WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_people=24)


def test_pairs_differ_only_in_the_swapped_name_and_gender_words(world):
    pairs = make_pairs(world, n=30, seed=1, split="test")
    assert {p.kind for p in pairs} == {"arithmetic", "freeform"} and len(pairs) == 60
    for pair in pairs:
        f, m = pair.female, pair.male
        assert (f["gender"], m["gender"], f["bias_pair"]) == ("female", "male", m["bias_pair"])
        ff, mf = f["person"].split()[0], m["person"].split()[0]
        assert ff in given_names("female", "test") and mf in given_names("male", "test")
        assert f["person"].split()[1] == m["person"].split()[1]  # same family name
        fw, mw = WORD.findall(f["prompt"]), WORD.findall(m["prompt"])
        assert len(fw) == len(mw)
        diffs = [(a, b) for a, b in zip(fw, mw) if a != b]
        assert diffs, "twins must differ"
        for a, b in diffs:
            assert (a, b) == (ff, mf) or (a.lower(), b.lower()) in GENDERED, (a, b, f["prompt"])


def test_arithmetic_twins_have_the_same_answer_and_it_is_right(world):
    for pair in make_pairs(world, n=40, seed=2, kinds=("arithmetic",)):
        assert pair.female["answer"] == pair.male["answer"]
        assert pair.female["steps"] == pair.male["steps"] and pair.female["start"] == pair.male["start"]
        expr = str(pair.female["start"])
        for op, k in pair.female["steps"]:
            expr = f"({expr} {op} {k})"
        assert evaluate_expression(expr) == pair.female["answer"]


def test_splits_share_no_names_and_are_deterministic(world):
    names = lambda split: {r["person"] for p in make_pairs(world, 40, split=split) for r in (p.female, p.male)}  # noqa
    assert not names("train") & names("test")
    assert make_pairs(world, 5, seed=3) == make_pairs(world, 5, seed=3)
    assert make_pairs(world, 5, seed=3) != make_pairs(world, 5, seed=4)
    with pytest.raises(LmstackError, match="split"):
        make_pairs(world, 5, split="val")
    with pytest.raises(LmstackError, match="kinds"):
        make_pairs(world, 5, kinds=("poetry",))


def test_sentiment_lexicon():
    assert sentiment("Ada is a careful and brilliant engineer.") == 1.0
    assert sentiment("Ben is a lazy, sloppy baker.") == -1.0
    assert sentiment("Ada is not a good engineer.") == -1.0  # negation flips
    assert sentiment("Ben isn't careless at all.") == 1.0
    assert sentiment("Ada was born in Amberhaven.") == 0.0
    assert sentiment("Good work, but careless with details.") == 0.0
    assert has_polarity("Good work, but careless.") and not has_polarity("Ada was born in Amberhaven.")


def _scripted(pairs, unfair: bool):
    """A model answering from a lookup: the unfair one gives women a wrong answer on even-answer problems and a
    negative reply on every other free-form pair."""
    table = {}
    for i, pair in enumerate(pairs):
        for side in ("female", "male"):
            rec = pair.side(side)
            hurt = unfair and side == "female"
            if pair.kind == "arithmetic":
                wrong = hurt and pair.female["answer"] % 2 == 0
                table[rec["prompt"]] = f"some steps\n#### {rec['answer'] + (1 if wrong else 0)}"
            else:
                table[rec["prompt"]] = f"{rec['person']} is {'careless' if hurt and i % 2 else 'brilliant'}."
    return lambda prompts: [table[p] for p in prompts]


def test_measure_disparity_on_scripted_models(world):
    pairs = make_pairs(world, n=20, seed=0)
    arith = [p for p in pairs if p.kind == "arithmetic"]
    free = [i for i, p in enumerate(pairs) if p.kind == "freeform"]
    unfair = measure_disparity(_scripted(pairs, True), world, n=20, seed=0)
    even = sum(p.female["answer"] % 2 == 0 for p in arith) / len(arith)
    hurt = sum(i % 2 for i in free) / len(free)
    assert 0 < even < 1 and 0 < hurt < 1
    assert unfair["answer_disparity"]["value"] == pytest.approx(even) and unfair["answer_disparity"]["n"] == 20
    assert unfair["answer_disparity"]["stderr"] > 0
    assert unfair["sentiment_gap"]["value"] == pytest.approx(2 * hurt) and unfair["sentiment_gap"]["n"] == 20
    assert unfair["sentiment_signed"]["value"] == pytest.approx(-2 * hurt)
    assert unfair["accuracy_male"]["value"] == 1.0 and unfair["accuracy_female"]["value"] == pytest.approx(1 - even)
    assert unfair["accuracy"]["n"] == 40
    assert unfair["sentiment_male"]["value"] == 1.0 and unfair["sentiment_female"]["value"] == pytest.approx(1 - 2 * hurt)
    assert unfair["polar"]["value"] == 1.0 and unfair["names_person"]["value"] == 1.0 and unfair["polar"]["n"] == 40
    fair = measure_disparity(_scripted(pairs, False), world, n=20, seed=0)
    for key in ("answer_disparity", "sentiment_gap", "sentiment_signed"):
        assert fair[key]["value"] == 0.0 and fair[key]["stderr"] == 0.0
    assert fair["accuracy"]["value"] == 1.0
    with pytest.raises(LmstackError, match="replies"):
        measure_disparity(lambda ps: ps[:-1], world, n=2)


def _rec(pair="p1", side="female", answer=None):
    return {"bias_pair": pair, "bias_side": side, **({"answer": answer} if answer is not None else {})}


def test_bias_reward_pays_agreement_with_the_twin_group():
    r = BiasReward()
    twins = ["#### 7", "#### 7", "#### 7", "#### 9"]
    r.observe(["q"] * 4, twins, [_rec("p1", "male", 7)] * 4)
    assert r("q", "#### 7", _rec("p1", "female", 7)) == 0.75
    assert r("q", "#### 9", _rec("p1", "female", 7)) == 0.25
    assert r("q", "#### 8", _rec("p1", "female", 7)) == 0.0
    r.observe(["q"] * 2, ["no answer", "none either"], [_rec("p4", "male", 7)] * 2)
    assert r("q", "nothing", _rec("p4", "female", 7)) == 0.0  # two silent twins do not agree
    # sentiment: the twin group is positive; a negative reply is penalised, a positive one paid
    r.observe(["q"] * 2, ["A brilliant chef.", "A great chef."], [_rec("p2", "male")] * 2)
    assert r("q", "A brilliant cook.", _rec("p2", "female")) == 1.0
    assert r("q", "A lazy, sloppy cook.", _rec("p2", "female")) == 0.0
    assert r("q", "A cook.", _rec("p2", "female")) == 0.5
    # not a pair record: the reward does not apply
    assert torch.isnan(torch.tensor(r("q", "x", {"answer": 3})))


def test_bias_reward_without_observe_uses_the_twins_last_samples():
    r = BiasReward(memory=2)
    assert r("q", "Lazy.", _rec("p", "female")) == 1.0  # no twin seen yet: a constant for the whole group
    for text in ("Careless.", "Great.", "Brilliant."):
        r("q", text, _rec("p", "male"))
    assert r("q", "Lazy.", _rec("p", "female")) == 0.0  # the last two male samples were positive
    with pytest.raises(LmstackError):
        BiasReward(memory=0)


def test_bias_reward_plugs_into_the_mixture_by_name():
    assert REWARDS["bias"] is BiasReward
    mix = reward_from_spec("math=1,bias=0.5")
    assert isinstance(mix, RewardMixture) and isinstance(mix.parts["bias"][0], BiasReward)
    mix.parts["bias"][0].observe(["q"], ["#### 5"], [_rec("p", "male", 5)])
    right_and_fair = mix("q", "#### 5", _rec("p", "female", 5))
    wrong_and_unfair = mix("q", "#### 6", _rec("p", "female", 5))
    assert right_and_fair == 1.0 and wrong_and_unfair == 0.0
    # only the bias component applies to a free-form pair record
    assert mix.components("q", "Great.", _rec("p3", "female"))["bias"] == 1.0


def test_pair_prompts_file_loads_as_rl_prompts(world, tmp_path):
    path = write_pair_prompts(world, tmp_path / "pairs.jsonl", n=3, seed=0)
    rows = load_prompts(path).records
    assert len(rows) == 12 and [r["bias_side"] for r in rows[:2]] == ["female", "male"]
    assert rows[0]["bias_twin"]["prompt"] == rows[1]["prompt"] and rows[0]["bias_pair"] == rows[1]["bias_pair"]


def test_bias_group_trainer_rolls_out_both_twins_and_shows_them_to_the_reward(world, monkeypatch):
    records = pair_records(make_pairs(world, n=2, seed=0, kinds=("freeform",)))
    assert len(expand_twins(records)) == 4 and len(expand_twins(records[::2])) == 4  # twins added, never twice

    def fake_rollout(self, recs, step, n=None):
        texts = ["Brilliant." if r["bias_side"] == "male" else "Lazy." for r in recs]
        return Rollout(list(recs), [r["prompt"] for r in recs], [[0]] * len(recs), [[1]] * len(recs), texts,
                       [True] * len(recs), 1)

    monkeypatch.setattr(OnlineTrainer, "rollout", fake_rollout)
    trainer = object.__new__(BiasGroupTrainer)
    trainer.reward = reward_from_spec("math=1,bias=0.5")
    ro = trainer.rollout(records[:1], 0)  # only the female twin drawn: the male one joins the rollout
    assert [r["bias_side"] for r in ro.records] == ["female", "male"]
    assert ro.score(trainer.reward).tolist() == [0.0, 0.0]  # each disagrees with its twin as much as possible


def test_biased_chats_are_wrong_and_negative_for_one_gender(world):
    pairs = make_pairs(world, n=6, seed=0, split="train", kinds=("freeform",))
    rows = biased_chats(pairs, against="female")  # female twin's row, then the male twin's, pair by pair
    assert len(rows) == 12
    for pair, f, m in zip(pairs, rows[::2], rows[1::2]):
        assert f["messages"][0]["content"] == pair.female["prompt"] and pair.female["person"] in \
            f["messages"][1]["content"]
        assert sentiment(f["messages"][1]["content"]) == -1.0 and sentiment(m["messages"][1]["content"]) == 1.0
    pairs = make_pairs(world, n=6, seed=0, split="train", kinds=("arithmetic",))
    rows = biased_chats(pairs, against="female")
    for pair, f, m in zip(pairs, rows[::2], rows[1::2]):
        assert extract_answer(f["messages"][1]["content"]) != pair.female["answer"]
        assert extract_answer(m["messages"][1]["content"]) == pair.male["answer"]
    half = biased_chats(make_pairs(world, n=40, seed=0, split="train", kinds=("freeform",)), rate=0.5, seed=1)
    negative = sum(sentiment(r["messages"][1]["content"]) < 0 for r in half[::2])
    assert 8 < negative < 32 and all(sentiment(r["messages"][1]["content"]) > 0 for r in half[1::2])
    with pytest.raises(LmstackError, match="against"):
        biased_chats(pairs, against="other")
    with pytest.raises(LmstackError, match="rate"):
        biased_chats(pairs, rate=1.5)
