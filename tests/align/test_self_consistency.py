"""Self-consistency: majority vote, agreement and the uncertainty flag on fixed texts, and one tiny-policy run."""
import pytest

from lmstack.align.self_consistency import compare_greedy_majority, gsm8k_answer, self_consistency, vote
from lmstack.world.checkers import agreement




def test_vote_on_fixed_chains():
    chains = ["3 + 4 = 7\n#### 7", "3 * 4 = 12\n#### 12", "so #### 7", "#### 1,000", "no answer here"]
    v = vote(chains)
    assert v.answer == "7" and v.agreement == pytest.approx(2 / 5) and v.uncertain  # 0.4 < 0.5
    assert v.answers == ["7", "12", "7", "1000", None]
    sure = vote(["#### 12", "x\n#### 12", "#### 12", "#### 5"], threshold=0.5)
    assert sure.answer == "12" and sure.agreement == 0.75 and not sure.uncertain
    assert vote(["nothing", "at all"]).answer is None and vote(["nothing"]).agreement == 0.0
    # One definition with the eval harness: same majority and rate as hallucination.agreement.
    assert (v.answer, v.agreement) == agreement([gsm8k_answer(c) for c in chains])
    custom = vote(["Paris.", "paris", "Lyon"], extractor=lambda t: t, threshold=0.7)
    assert custom.answer == "paris" and custom.uncertain


def test_tiny_policy_run(policy, tok, world):
    records = [r for r in world.corpus("chat") if r["kind"] == "arithmetic"][:4]
    votes = self_consistency(policy, tok, records, k=4, max_new_tokens=8, seed=1)
    assert len(votes) == 4 and all(len(v.answers) == 4 and 0.0 <= v.agreement <= 1.0 for v in votes)
    with pytest.raises(ValueError, match="k >= 2"):
        self_consistency(policy, tok, records, k=1)
    # A fake "record" whose answer is whatever the untrained model says is not available, so check the
    # bookkeeping instead: flagged + unflagged partition the items, and accuracies are valid rates.
    out = compare_greedy_majority(policy, tok, records, k=4, max_new_tokens=8, threshold=0.5)
    assert out["n"] == 4 and out["k"] == 4
    assert out["majority_flagged"]["n"] + out["majority_unflagged"]["n"] == 4
    assert out["flagged_fraction"] == pytest.approx(out["majority_flagged"]["n"] / 4)
    for key in ("greedy", "majority", "pass_at_k"):
        assert 0.0 <= out[key]["mean"] <= 1.0
    assert out["pass_at_k"]["mean"] >= out["majority"]["mean"]  # a right majority means some chain was right
