"""Scaling-law fits: Chinchilla's parametric law, the compute-optimal frontier, and bootstrap intervals.

Hoffmann et al. (2022) fit the final loss of runs with N parameters trained on D tokens as

    L(N, D) = E + A / N^alpha + B / D^beta

by minimising the Huber loss (delta 1e-3) of log-space residuals, log L_hat - log L, with L-BFGS from a grid of
starting points (approach 3). Under C = 6 N D training FLOPs the law's compute-optimal split is

    N*(C) = G (C / 6)^(beta / (alpha + beta)),  D*(C) = C / (6 N*),  G = (alpha A / (beta B))^(1 / (alpha + beta)).

The paper's other two estimates of the frontier are here too, both power laws N_opt = k C^a fitted in log space:
- approach 1, `frontier_minima`: runs are grouped by compute (bins a factor `bin_ratio` wide) and the lowest loss
  of each group gives (C, N_opt);
- approach 2, `isoflop_parabolas`: runs that share a FLOP budget are fitted with a parabola of loss in log N, whose
  vertex gives N_opt for that budget.
`bootstrap` refits resampled runs for percentile intervals on alpha, beta, a = beta / (alpha + beta) and the
tokens-per-parameter ratio D*/N* at a given compute.

A fit needs more points than it has parameters: the law has 5, so fewer than 8 runs are refused; a parabola
needs 3 sizes per budget and a frontier 2 budgets.

Usage:
    runs = [Run(n_params=2e5, tokens=4e6, loss=3.1), ...]
    law = fit_chinchilla(runs)                          # ChinchillaLaw(E, A, B, alpha, beta)
    law.loss(1e6, 2e7); n_opt, d_opt = law.optimal(1e15)
    k, a = frontier_minima(runs); k, a, vertices = isoflop_parabolas(runs)
    intervals = bootstrap(runs, n_boot=200, at_flops=1e15)   # {"alpha": (lo, hi), ...}
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

from lmstack.errors import LmstackError

HUBER_DELTA = 1e-3  # the paper's: log-loss residuals are small, so this is nearly an L1 fit, robust to outliers
LAW_PARAMS = 5


@dataclass(frozen=True)
class Run:
    """One finished training run: parameters (non-embedding or all: be consistent), tokens seen, final loss."""

    n_params: float
    tokens: float
    loss: float

    @property
    def flops(self) -> float:
        """Training FLOPs by the 6 N D rule (Kaplan et al.): forward 2 N D, backward 4 N D."""
        return 6.0 * self.n_params * self.tokens


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params, tokens):
        """Predicted loss; works on floats and numpy arrays alike."""
        return self.E + self.A / np.power(n_params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def exponent(self) -> float:
        """a in N*(C) proportional to C^a."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N*, D*) minimising the law's loss at `flops` = 6 N D."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (flops / 6.0) ** self.exponent
        return float(n), float(flops / (6.0 * n))

    def to_dict(self) -> dict:
        return asdict(self)


def _arrays(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bad = [r for r in runs if not (r.n_params > 0 and r.tokens > 0 and r.loss > 0 and math.isfinite(r.loss))]
    if bad:
        raise LmstackError(f"runs need positive n_params, tokens and a finite positive loss; bad: {bad[:3]}")
    return (np.log([r.n_params for r in runs]), np.log([r.tokens for r in runs]), np.log([r.loss for r in runs]))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log L_hat - log L, with L_hat = exp(LSE(a - alpha log N, b - beta log D, e)), and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    # a hand-written log-sum-exp (max-shifted, so as stable as scipy's): a fit calls this ~20k times, and
    # scipy.special.logsumexp's overhead made that 4x slower
    top = terms.max(axis=0)
    shifted = np.exp(terms - top)
    total = shifted.sum(axis=0)
    pred = top + np.log(total)
    r = pred - log_l
    w = shifted / total  # d pred / d term
    a_r = np.abs(r)
    dr = np.where(a_r <= delta, r, delta * np.sign(r))  # d huber / d r
    wd = dr * w
    grad = np.array([wd[0].sum(), wd[1].sum(), wd[2].sum(), -(wd[0] @ log_n), -(wd[1] @ log_d)])
    return float(_huber(r, delta).sum()), grad


# Starting points (a = log A, b = log B, e = log E, alpha, beta): a coarser version of the paper's grid, which
# had 4,500 starts; with these 243 the best fit on our tests matches the full grid's.
START_GRID = [np.array(p, dtype=float) for p in itertools.product((0.0, 10.0, 20.0), (0.0, 10.0, 20.0), (-1.0, 0.0, 1.0),
                                                                  (0.2, 0.6, 1.2), (0.2, 0.6, 1.2))]


def _theta(law: ChinchillaLaw) -> np.ndarray:
    # a fit can drive E (or A, B) to exp(-huge) = 0.0, a real outcome on a small grid: start its refits from
    # a tiny positive value instead of failing on log(0)
    return np.array([math.log(max(v, 1e-30)) for v in (law.A, law.B, law.E)] + [law.alpha, law.beta])


def fit_chinchilla(runs: list[Run], delta: float = HUBER_DELTA,
                   starts: list[np.ndarray] | None = None) -> ChinchillaLaw:
    """Chinchilla's approach 3: the best of L-BFGS fits from `starts` (default START_GRID) over
    (log A, log B, log E, alpha, beta)."""
    if len(runs) < LAW_PARAMS + 3:
        raise LmstackError(f"a Chinchilla fit has {LAW_PARAMS} parameters and needs at least {LAW_PARAMS + 3} runs; "
                           f"got {len(runs)}: add model sizes or token counts to the grid")
    log_n, log_d, log_l = _arrays(runs)
    if len(set(log_n.round(6))) < 2 or len(set(log_d.round(6))) < 2:
        raise LmstackError("a Chinchilla fit needs at least two model sizes and two token counts to separate "
                           "A/N^alpha from B/D^beta")
    best = None
    for start in START_GRID if starts is None else starts:
        res = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       options={"maxiter": 500})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, b, e, alpha, beta = best.x
    return ChinchillaLaw(E=float(math.exp(e)), A=float(math.exp(a)), B=float(math.exp(b)), alpha=float(alpha),
                         beta=float(beta))


def _power_law(flops: np.ndarray, n_opt: np.ndarray) -> tuple[float, float]:
    """(k, a) of n_opt = k * flops^a, least squares in log-log."""
    a, log_k = np.polyfit(np.log(flops), np.log(n_opt), 1)
    return float(math.exp(log_k)), float(a)


def frontier_minima(runs: list[Run], bin_ratio: float = 1.5) -> tuple[float, float, list[tuple[float, float]]]:
    """Approach 1: runs grouped by compute (each group spans at most a factor bin_ratio), the lowest-loss run of
    each group gives (C, N_opt); returns (k, a, the points) of N_opt = k C^a."""
    _arrays(runs)
    ordered = sorted(runs, key=lambda r: r.flops)
    groups, current = [], [ordered[0]]
    for run in ordered[1:]:
        if run.flops <= current[0].flops * bin_ratio:
            current.append(run)
        else:
            groups.append(current)
            current = [run]
    groups.append(current)
    points = [(best.flops, best.n_params) for best in (min(g, key=lambda r: r.loss) for g in groups if len(g) >= 2)]
    if len(points) < 2:
        raise LmstackError(f"approach 1 needs at least two compute groups of two or more runs each (groups within a "
                           f"factor {bin_ratio}); got {len(points)}: run several sizes at each budget")
    k, a = _power_law(np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return k, a, points


def isoflop_parabolas(runs: list[Run], rel_tol: float = 0.05) -> tuple[float, float, list[tuple[float, float]]]:
    """Approach 2: runs whose FLOPs agree within rel_tol share a budget; each budget's loss is fitted with a parabola
    in log N, its vertex is N_opt; returns (k, a, the (C, N_opt) vertices) of N_opt = k C^a."""
    _arrays(runs)
    budgets: list[list[Run]] = []
    for run in sorted(runs, key=lambda r: r.flops):
        if budgets and abs(run.flops - budgets[-1][0].flops) <= rel_tol * budgets[-1][0].flops:
            budgets[-1].append(run)
        else:
            budgets.append([run])
    vertices = []
    for group in budgets:
        if len({round(r.n_params) for r in group}) < 3:
            continue
        x = np.log([r.n_params for r in group])
        c2, c1, _ = np.polyfit(x, [r.loss for r in group], 2)
        if c2 <= 0:  # no minimum inside: the budget's sizes all sit on one side of the optimum
            continue
        vertices.append((float(np.mean([r.flops for r in group])), float(math.exp(-c1 / (2 * c2)))))
    if len(vertices) < 2:
        raise LmstackError(f"approach 2 needs at least two FLOP budgets with three or more sizes each and a minimum "
                           f"inside; got {len(vertices)} usable of {len(budgets)} budgets")
    k, a = _power_law(np.array([v[0] for v in vertices]), np.array([v[1] for v in vertices]))
    return k, a, vertices


def bootstrap(runs: list[Run], n_boot: int = 200, seed: int = 0, at_flops: float | None = None,
              level: float = 0.9, law: ChinchillaLaw | None = None) -> dict[str, tuple[float, float]]:
    """Percentile intervals (level, e.g. 0.9 -> 5th..95th) over n_boot refits of runs resampled with replacement:
    alpha, beta, the frontier exponent a, and (with at_flops) tokens per parameter D*/N* there. A resample that
    cannot be fitted (too few distinct sizes) is skipped. `law`: the full fit of `runs`, when the caller has it
    (saves refitting it from the whole start grid)."""
    rng = np.random.default_rng(seed)
    start = _theta(law or fit_chinchilla(runs))  # resamples start from the full fit (and its neighbours), not the whole grid
    starts = [start, start + np.array([1.0, 1.0, 0.0, 0.1, 0.1]), start - np.array([1.0, 1.0, 0.0, 0.1, 0.1])]
    draws: dict[str, list[float]] = {"alpha": [], "beta": [], "exponent": []}
    if at_flops is not None:
        draws["tokens_per_param"] = []
    for _ in range(n_boot):
        sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        try:
            law = fit_chinchilla(sample, starts=starts)
        except LmstackError:
            continue
        draws["alpha"].append(law.alpha)
        draws["beta"].append(law.beta)
        draws["exponent"].append(law.exponent)
        if at_flops is not None:
            n, d = law.optimal(at_flops)
            draws["tokens_per_param"].append(d / n)
    if len(draws["alpha"]) < max(10, n_boot // 2):
        raise LmstackError(f"only {len(draws['alpha'])} of {n_boot} bootstrap resamples could be fitted; add runs")
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items()}
