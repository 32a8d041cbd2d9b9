"""Best-of-n curves: KL_bon's closed form, the nested pick, the all-subsets estimator against brute force and
pass@k, tie handling, the curve's rows and peak, and clear errors on bad pools."""
import itertools
import math

import pytest
import torch

from lmstack.align.best_of_n import best_of_n, bon_curve, kl_bon, peak_n
from lmstack.errors import LmstackError


def test_kl_bon_closed_form():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bon(64) == pytest.approx(math.log(64) - 63 / 64)
    assert all(kl_bon(n) < kl_bon(n + 1) for n in range(1, 70))  # monotone: more samples, further from the policy
    for bad in (0, -1, 2.0, True):
        with pytest.raises(LmstackError, match="n >= 1"):
            kl_bon(bad)


def test_nested_picks_the_proxy_best_among_the_first_n_and_ties_go_first():
    proxy = torch.tensor([[0.1, 0.9, 0.5, 2.0], [1.0, 1.0, 0.0, 1.0]])
    gold = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    assert best_of_n(proxy, gold, 1)["gold"].tolist() == [10.0, 1.0]
    two = best_of_n(proxy, gold, 2)
    assert two["gold"].tolist() == [20.0, 1.0]  # row 2: samples 0 and 1 tie, the first wins
    assert two["proxy"].tolist() == pytest.approx([0.9, 1.0])
    assert best_of_n(proxy, gold, 4)["gold"].tolist() == [40.0, 1.0]


def _brute_force(proxy, gold, n):
    """Mean over every n-subset of the pool of the gold of the subset's proxy pick (first of ties)."""
    out = []
    for p_row, g_row in zip(proxy.tolist(), gold.tolist()):
        picks = []
        for subset in itertools.combinations(range(len(p_row)), n):
            best = max(subset, key=lambda i: (p_row[i], -i))
            picks.append(g_row[best])
        out.append(sum(picks) / len(picks))
    return out


def test_expected_matches_brute_force_over_all_subsets_with_ties():
    g = torch.Generator().manual_seed(0)
    proxy = torch.randint(0, 3, (5, 7), generator=g).double()  # few distinct values: many ties
    gold = torch.randn(5, 7, generator=g).double()
    for n in range(1, 8):
        got = best_of_n(proxy, gold, n, estimator="expected")["gold"]
        assert got.tolist() == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)
    # n = 1 is the pool mean; n = N is the nested pick of the whole pool
    assert best_of_n(proxy, gold, 1, "expected")["gold"].tolist() == pytest.approx(gold.mean(1).tolist())
    whole = best_of_n(proxy, gold, 7)["gold"].tolist()
    assert best_of_n(proxy, gold, 7, "expected")["gold"].tolist() == pytest.approx(whole)


def test_oracle_expected_is_unbiased_pass_at_k():
    gold = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [1] * 8], dtype=torch.float64)
    for n in (1, 2, 4, 8):
        got = best_of_n(gold, gold, n, estimator="expected")["gold"].tolist()
        want = [1 - math.comb(8 - int(c), n) / math.comb(8, n) for c in gold.sum(1).tolist()]
        assert got == pytest.approx(want)


def test_curve_rises_with_a_true_proxy_falls_with_a_wrong_one_and_peaks():
    g = torch.Generator().manual_seed(1)
    gold = (torch.rand(200, 16, generator=g) < 0.3).double()
    good = bon_curve(gold + 0.01 * torch.rand(200, 16, generator=g), gold, [1, 2, 4, 8, 16], "expected")
    bad = bon_curve(-gold, gold, [1, 2, 4, 8, 16], "expected")
    assert [r["n"] for r in good] == [1, 2, 4, 8, 16] and good[0]["prompts"] == 200
    assert good[0]["gain"] == 0.0 and good[0]["kl"] == 0.0 and good[3]["kl"] == pytest.approx(kl_bon(8))
    assert all(a["gold"] < b["gold"] for a, b in zip(good, good[1:]))
    assert all(a["gold"] > b["gold"] for a, b in zip(bad, bad[1:]))
    assert peak_n(good) == 16 and peak_n(bad) == 1
    assert good[0]["gold_stderr"] == pytest.approx(float(gold.mean(1).std()) / math.sqrt(200))
    assert good[-1]["gain_stderr"] > 0 and good[-1]["gain"] == pytest.approx(good[-1]["gold"] - good[0]["gold"])
    # an over-optimised proxy: right on typical samples, but it loves a rare wrong one (gold falls after a rise)
    proxy = gold.clone()
    proxy[:, 5] = torch.where(gold[:, 5] == 0, 5.0, 1.0)
    mid = bon_curve(proxy, gold, [1, 2, 4, 8, 16], "expected")
    assert peak_n(mid) in (2, 4, 8) and mid[-1]["gold"] < max(r["gold"] for r in mid)


def test_bad_pools_raise_clear_errors():
    ok = torch.zeros(2, 4)
    with pytest.raises(LmstackError, match="same non-empty"):
        best_of_n(ok, torch.zeros(2, 3), 1)
    with pytest.raises(LmstackError, match="same non-empty"):
        best_of_n(torch.zeros(4), torch.zeros(4), 1)
    with pytest.raises(LmstackError, match="finite"):
        best_of_n(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), 1)
    with pytest.raises(LmstackError, match="pool has 4"):
        best_of_n(ok, ok, 8)
    with pytest.raises(LmstackError, match="unknown best-of-n estimator"):
        best_of_n(ok, ok, 2, estimator="mean")
    with pytest.raises(LmstackError, match="at least one n"):
        bon_curve(ok, ok, [])
    with pytest.raises(LmstackError, match="non-empty curve"):
        peak_n([])
