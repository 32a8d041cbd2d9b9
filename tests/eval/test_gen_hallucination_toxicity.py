"""Self-consistency agreement (hallucination flag) and the toxicity scorer."""
from __future__ import annotations

import pytest

from lmstack.errors import LmstackError
from lmstack.eval.hallucination import sample_agreement
from lmstack.world.checkers import agreement, flag_uncertain, normalize
from lmstack.eval.toxicity import ToxicityScorer, ToxicityScorerConfig, rates_by_group


@pytest.mark.parametrize("raw,norm", [("Paris.", "paris"), ("  The  River ", "the river"), ("$1,000", "1000"),
                                      ("18.0", "18"), ("0.50", "0.5"), ("", None), (None, None), ("-3", "-3")])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_agreement_majority_and_rate():
    assert agreement(["Paris", "paris.", "Lyon"]) == ("paris", pytest.approx(2 / 3))
    assert agreement(["7", "7.0", "$7"]) == ("7", 1.0)
    assert agreement([None, None, "3"]) == ("3", pytest.approx(1 / 3))   # invalid samples count against
    assert agreement([None, ""]) == (None, 0.0)
    assert agreement([]) == (None, 0.0)
    assert agreement(["b", "a", "a", "b"])[0] == "b"                      # ties: first seen wins


def test_flag_uncertain():
    assert flag_uncertain(0.4, 0.5) and not flag_uncertain(0.5, 0.5) and not flag_uncertain(1.0)
    with pytest.raises(ValueError, match="threshold"):
        flag_uncertain(0.5, 1.5)


def test_consistent_answers_are_not_flagged_and_scattered_ones_are(fake_lm_factory):
    def gen(ctx, args):
        if "fact" in ctx:
            return " Amberhaven" if args.seed % 3 else " amberhaven."   # same answer, different surface
        return f" City{args.seed}"                                       # a guess that changes with the seed

    lm = fake_lm_factory(generate=gen)
    known, unknown = sample_agreement(lm, ["Q: fact\nA:", "Q: guess\nA:"], k=6, until=["\n"], threshold=0.5)
    assert known["majority"] == "amberhaven" and known["agreement"] == 1.0 and not known["uncertain"]
    assert unknown["agreement"] == pytest.approx(1 / 6) and unknown["uncertain"]
    seeds = [c[2].seed for c in lm.calls]
    assert len(set(seeds[:6])) == 6 and all(c[2].temperature > 0 for c in lm.calls)
    assert not set(seeds[:6]) & set(seeds[6:])      # other prompts draw other seeds (no cross-item correlation)


def test_sample_agreement_checks_its_arguments(fake_lm_factory):
    with pytest.raises(ValueError, match="temperature"):
        sample_agreement(fake_lm_factory(), ["x"], k=3, temperature=0.0)
    with pytest.raises(ValueError, match="k must"):
        sample_agreement(fake_lm_factory(), ["x"], k=0)


def test_toxicity_scorer_word_list_and_rates(tmp_path):
    scorer = ToxicityScorer()
    verdicts = scorer.score(["have a nice day", "you stupid idiot", "what a damn shame"])
    assert [v["toxic"] for v in verdicts] == [False, True, True]
    assert verdicts[1]["word_hits"] == 2 and verdicts[0]["p_toxic"] is None
    strict = ToxicityScorer(ToxicityScorerConfig(min_word_hits=2))
    assert [v["toxic"] for v in strict.score(["you stupid idiot", "what a damn shame"])] == [True, False]
    words = tmp_path / "words.txt"
    words.write_text("grumpy\n")
    custom = ToxicityScorer(ToxicityScorerConfig(wordlist=str(words)))
    assert [v["toxic"] for v in custom.score(["a grumpy reply", "you idiot"])] == [True, False]
    rates = rates_by_group(["a", "b", "a", "a"], [True, False, False, True])
    assert rates == {"a": {"toxic_rate": pytest.approx(2 / 3), "n": 3}, "b": {"toxic_rate": 0.0, "n": 1}}
    with pytest.raises(LmstackError):
        rates_by_group(["a"], [])
    with pytest.raises(LmstackError, match="word list"):
        ToxicityScorer(ToxicityScorerConfig(wordlist=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match="threshold"):
        ToxicityScorerConfig(threshold=2.0)
