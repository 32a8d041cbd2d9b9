"""Metrics against hand-computed values: acc, acc_norm, exact_match, pass@k, ECE, bootstrap stderr."""
import math
import random

import pytest

from lmstack.eval import metrics as M


def test_acc_picks_the_argmax_and_first_on_ties():
    assert M.acc([-3.0, -1.0, -2.0], 1) == 1.0
    assert M.acc([-3.0, -1.0, -2.0], 2) == 0.0
    assert M.acc([-1.0, -1.0], 0) == 1.0 and M.acc([-1.0, -1.0], 1) == 0.0   # numpy.argmax tie rule
    assert M.acc([-3.0, -1.0], [0, 1]) == 1.0                                 # several golds


def test_acc_norm_divides_by_character_length_of_the_choice():
    # Raw: -2 > -3 picks choice 0. Per character: -2/1 = -2 < -3/6 = -0.5 picks choice 1.
    lls, choices = [-2.0, -3.0], ["a", "bbbbbb"]
    assert M.acc(lls, 0) == 1.0
    assert M.acc_norm(lls, choices, 0) == 0.0
    assert M.acc_norm(lls, choices, 1) == 1.0
    assert M.acc_norm([-1.0, -5.0], ["", "xxxxxx"], 1) == 1.0   # empty choice counts as length 1, no crash


def test_exact_match_folds_case_and_whitespace_only():
    assert M.exact_match("  Paris \n", "paris") == 1.0
    assert M.exact_match("Paris.", "paris") == 0.0
    assert M.exact_match("Paris.", "paris", ignore_punctuation=True) == 1.0
    assert M.exact_match("42", ["41", "42"]) == 1.0


@pytest.mark.parametrize("n,c,k,expected", [
    (10, 3, 1, 0.3),                      # pass@1 = c/n
    (5, 2, 2, 1 - 3 / 10),                # 1 - C(3,2)/C(5,2)
    (5, 0, 3, 0.0),
    (5, 3, 3, 1.0),                       # n - c < k: some sample in every k-subset passes
    (20, 4, 5, 1 - math.comb(16, 5) / math.comb(20, 5)),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert M.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c <= n"):
        M.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        M.pass_at_k(3, 1, 4)


def test_ece_by_hand():
    ln = math.log
    # Item 1: probs (0.9, 0.1), predicts 0, gold 0 -> conf 0.9 correct, bin (0.8, 0.9].
    # Item 2: probs (0.6, 0.4), predicts 0, gold 1 -> conf 0.6 wrong,   bin (0.5, 0.6].
    # Item 3: probs (0.65, 0.35), predicts 0, gold 0 -> conf 0.65 correct, bin (0.6, 0.7].
    lls = [[ln(0.9), ln(0.1)], [ln(0.6), ln(0.4)], [ln(0.65), ln(0.35)]]
    golds = [0, 1, 0]
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.65)) / 3
    assert M.ece(lls, golds) == pytest.approx(expected, abs=1e-9)
    # Two items in one bin are averaged before the gap is taken: confs 0.55 (right) and 0.58 (wrong).
    lls2 = [[ln(0.55), ln(0.45)], [ln(0.58), ln(0.42)]]
    assert M.ece(lls2, [0, 1]) == pytest.approx(abs(0.5 - (0.55 + 0.58) / 2), abs=1e-9)
    # Perfectly calibrated certainty: confidence 1 and always right.
    assert M.ece([[0.0, -1e9]] * 4, [0] * 4) == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_stderr_is_seeded_and_close_to_the_closed_form():
    rng = random.Random(0)
    values = [float(rng.random() < 0.3) for _ in range(400)]
    a = M.bootstrap_stderr(M.mean, values, iters=2000, seed=7)
    b = M.bootstrap_stderr(M.mean, values, iters=2000, seed=7)
    c = M.bootstrap_stderr(M.mean, values, iters=2000, seed=8)
    assert a == b and a != c
    closed = M.mean_stderr(values)
    assert closed == pytest.approx(math.sqrt(0.3 * 0.7 / 400), rel=0.1)
    assert a == pytest.approx(closed, rel=0.1)
    assert math.isnan(M.bootstrap_stderr(M.mean, [1.0], iters=100))


def test_bootstrap_works_for_aggregates_without_a_closed_form():
    rng = random.Random(1)
    probs = [rng.uniform(0.5, 0.99) for _ in range(200)]
    items = [([math.log(p), math.log(1 - p)], int(rng.random() < 0.5)) for p in probs]
    err = M.bootstrap_stderr(lambda xs: M.ece([a for a, _ in xs], [g for _, g in xs]), items, iters=200, seed=3)
    assert 0.0 < err < 0.1
