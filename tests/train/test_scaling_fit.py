"""Chinchilla fits recover a known law and predict past their data; the frontier estimates agree; bad grids are refused."""
import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.train.scaling import ChinchillaLaw, Run, bootstrap, fit_chinchilla, frontier_minima, isoflop_parabolas

TRUE = ChinchillaLaw(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)  # about Chinchilla's published fit


def grid_runs(noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    return [Run(n, d, float(TRUE.loss(n, d) * np.exp(rng.normal(0, noise))))
            for n in np.geomspace(5e4, 5e6, 6) for d in np.geomspace(1e6, 1e8, 5)]


def isoflop_runs(noise=0.002, seed=1):
    rng = np.random.default_rng(seed)
    runs = []
    for c in np.geomspace(1e14, 1e16, 4):
        n_opt, _ = TRUE.optimal(c)
        for n in n_opt * np.geomspace(0.2, 5.0, 7):
            d = c / (6 * n)
            runs.append(Run(n, d, float(TRUE.loss(n, d) * np.exp(rng.normal(0, noise)))))
    return runs


@pytest.fixture(scope="module")
def law():
    return fit_chinchilla(grid_runs())


def test_the_fit_recovers_the_exponents_and_predicts_a_larger_run(law):
    assert abs(law.alpha - TRUE.alpha) < 0.03 and abs(law.beta - TRUE.beta) < 0.03
    # 4x past the largest model and token count: the prediction the law exists for
    n, d = 2e7, 4e8
    assert abs(law.loss(n, d) / TRUE.loss(n, d) - 1) < 0.02
    n_opt, d_opt = law.optimal(1e18)
    true_n, true_d = TRUE.optimal(1e18)
    assert abs(np.log(n_opt / true_n)) < np.log(1.5) and abs(6 * n_opt * d_opt / 1e18 - 1) < 1e-9


def test_the_frontier_from_minima_and_from_isoflop_parabolas_matches_the_law():
    runs = isoflop_runs()
    k2, a2, vertices = isoflop_parabolas(runs)
    assert len(vertices) == 4 and abs(a2 - TRUE.exponent) < 0.05
    for c, n in vertices:  # each vertex within a factor 1.3 of the true optimum at its budget
        assert abs(np.log(n / TRUE.optimal(c)[0])) < np.log(1.3)
    k1, a1, points = frontier_minima(runs, bin_ratio=1.5)
    assert len(points) == 4 and abs(a1 - TRUE.exponent) < 0.15  # approach 1 only sees the grid's sizes


def test_bootstrap_intervals_are_ordered_and_hold_the_full_fit(law):
    intervals = bootstrap(grid_runs(), n_boot=20, seed=0, at_flops=1e17)
    assert set(intervals) == {"alpha", "beta", "exponent", "tokens_per_param"}
    for name, (lo, hi) in intervals.items():
        assert lo <= hi
    lo, hi = intervals["alpha"]
    assert lo - 0.01 <= law.alpha <= hi + 0.01
    lo, hi = intervals["tokens_per_param"]
    assert 1 < lo <= hi < 200


def test_grids_too_small_or_bad_are_refused():
    runs = grid_runs()
    with pytest.raises(LmstackError, match="needs at least 8 runs"):
        fit_chinchilla(runs[:7])
    with pytest.raises(LmstackError, match="two model sizes"):
        fit_chinchilla([Run(1e5, d, 3.0 + d * 1e-9) for d in np.geomspace(1e6, 1e8, 9)])
    with pytest.raises(LmstackError, match="finite positive loss"):
        fit_chinchilla(runs[:8] + [Run(1e5, 1e6, float("nan"))])
    with pytest.raises(LmstackError, match="approach 2 needs"):
        isoflop_parabolas(runs[:2])
    with pytest.raises(LmstackError, match="approach 1 needs"):
        frontier_minima([Run(1e5, 1e6, 3.0), Run(1e7, 1e9, 2.0)])
