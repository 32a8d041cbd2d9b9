"""The privacy accountant of DP-SGD: Renyi DP of the Poisson-subsampled Gaussian mechanism, composed over steps
and converted to (epsilon, delta).

One DP-SGD step samples each training record with probability q (Poisson sampling), clips every record's
gradient to norm C and adds N(0, sigma^2 C^2) noise to their sum: the sampled Gaussian mechanism. Its Renyi DP
at order alpha (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"):
  integer alpha:    A = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))   (a finite sum)
  fractional alpha: A = A0 + A1, two infinite series whose terms carry Gaussian tail masses (erfc) around the
                    crossing point z0 = sigma^2 log(1/q - 1) + 1/2; summed until the terms fall below e^-30
  rdp(alpha) = log(A) / (alpha - 1)
RDP composes by addition (T steps: T * rdp), and converts to (epsilon, delta)-DP by Balle et al. 2020
("Hypothesis testing interpretations and Renyi DP", Thm 21), the conversion opacus and TF Privacy use:
  epsilon = min over alpha of  T rdp(alpha) - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)
Everything is computed in log space, so large orders and small sigmas neither overflow nor lose the sum.
Tests check it against opacus' RDPAccountant (within 1%) and a case worked by hand (q = 1: rdp = alpha/2sigma^2).

Usage:
    from lmstack.safety.rdp import epsilon, sigma_for_epsilon
    eps = epsilon(steps=1000, sample_rate=0.01, sigma=1.1, delta=1e-5)          # about 2.6
    sigma = sigma_for_epsilon(8.0, steps=1000, sample_rate=0.01, delta=1e-5)   # the least noise for eps <= 8
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

from lmstack.errors import LmstackError

# Fine steps where the optimum usually lies for epsilon ~ 1..10 (orders 1.1..10.9), integers above, and a few
# large orders for tiny epsilons (many steps of a small sample rate). A superset of opacus' default grid, so our
# epsilon is never looser than its own.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10 for x in range(1, 100)] + list(range(11, 64))
                                          + [80, 96, 128, 192, 256])
MAX_TERMS = 1000
"""A fractional order's series stops here; one that has not converged by then is left out (its bound: inf)."""
MAX_SIGMA = 1000.0
"""sigma_for_epsilon searches noise multipliers up to this; a target it cannot reach there is refused."""


def _log_erfc(x: float) -> float:
    # log(erfc(x)) = log(2 * Phi(-x * sqrt 2)); log_ndtr keeps its precision far into the tail where erfc underflows
    return math.log(2.0) + float(special.log_ndtr(-x * math.sqrt(2.0)))


def _signed_logsumexp(logs: list[float], signs: list[float]) -> float:
    """log(sum_i sign_i exp(logs_i)); the total must be positive (it is, for the series A0 + A1 here)."""
    top = max(logs)
    total = math.fsum(s * math.exp(v - top) for v, s in zip(logs, signs))
    if total <= 0:
        raise LmstackError("privacy accountant: the RDP series lost its precision (sigma too small for this order)")
    return top + math.log(total)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    return _signed_logsumexp(terms, [1.0] * len(terms))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    logs, signs = [], []
    i = 0
    while True:
        coef = float(special.binom(alpha, i))
        j = alpha - i
        log_coef = math.log(abs(coef)) if coef != 0 else -math.inf
        # the series around the mixture's two components, each weighted by a Gaussian tail beyond z0
        s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        sign = 1.0 if coef > 0 else -1.0
        logs += [s0, s1]
        signs += [sign, sign]
        i += 1
        if max(s0, s1) < -30 and i > alpha:  # past alpha the terms only shrink
            break
        if i > MAX_TERMS:
            # with very large sigma the terms shrink only polynomially; this order then bounds nothing (inf)
            # and the integer orders, summed exactly, give the epsilon
            return math.inf
    return _signed_logsumexp(logs, signs)


def rdp_sampled_gaussian(sample_rate: float, sigma: float, order: float) -> float:
    """Renyi DP at `order` of one step of the Poisson-subsampled Gaussian mechanism (noise multiplier sigma)."""
    q = sample_rate
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:  # no subsampling: the Gaussian mechanism's exact RDP
        return order / (2 * sigma**2)
    if float(order).is_integer():
        log_a = _log_a_integer(q, sigma, int(order))
    else:
        log_a = _log_a_fractional(q, sigma, float(order))
    return log_a / (order - 1) if math.isfinite(log_a) else math.inf


def _check(steps: int, sample_rate: float, delta: float) -> None:
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise LmstackError(f"privacy accountant: steps={steps!r} must be an integer >= 0")
    if not 0 <= sample_rate <= 1:
        raise LmstackError(f"privacy accountant: sample_rate={sample_rate} must lie in [0, 1] (rows sampled per "
                           f"step / training rows)")
    if not 0 < delta < 1:
        raise LmstackError(f"privacy accountant: delta={delta} must lie in (0, 1); use well below 1/n for n "
                           f"training records (e.g. 1e-5)")


def rdp_curve(sample_rate: float, sigma: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one step at every order (T steps: multiply by T)."""
    return np.array([rdp_sampled_gaussian(sample_rate, sigma, a) for a in orders])


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) of a composed RDP curve at this delta (Balle et al. 2020's conversion)."""
    a = np.asarray(orders, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.all(np.isnan(eps) | np.isinf(eps)):
        return math.inf, math.nan
    k = int(np.nanargmin(eps))
    return max(float(eps[k]), 0.0), float(a[k])


def epsilon(steps: int, sample_rate: float, sigma: float, delta: float,
            orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The epsilon that `steps` DP-SGD steps spend at this delta (Poisson sampling at `sample_rate`, noise
    multiplier sigma); inf when sigma is 0 and something was sampled."""
    _check(steps, sample_rate, delta)
    if sigma < 0:
        raise LmstackError(f"privacy accountant: sigma={sigma} must be >= 0")
    if steps == 0 or sample_rate == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    return epsilon_from_rdp(steps * rdp_curve(sample_rate, sigma, orders), delta, orders)[0]


def sigma_for_epsilon(target_epsilon: float, steps: int, sample_rate: float, delta: float,
                      max_sigma: float = MAX_SIGMA, orders: Sequence[float] = DEFAULT_ORDERS,
                      rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to rel_tol) whose `steps` steps spend at most target_epsilon, by bisection
    (epsilon falls as sigma grows). Refuses a target no sigma up to max_sigma reaches, naming the numbers."""
    _check(steps, sample_rate, delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise LmstackError(f"privacy accountant: target epsilon={target_epsilon} must be a finite number > 0")
    if steps == 0 or sample_rate == 0:
        return 0.0  # nothing is released about any record: no noise is needed
    best = epsilon(steps, sample_rate, max_sigma, delta, orders)
    if best > target_epsilon:
        raise LmstackError(
            f"privacy accountant: epsilon={target_epsilon} at delta={delta} cannot be reached in {steps} steps at "
            f"sample rate {sample_rate:.4g}: even noise multiplier sigma={max_sigma:g} spends epsilon={best:.4g}. "
            f"Raise epsilon or delta, or train fewer steps or on smaller batches (a lower sample rate)")
    lo, hi = 0.0, max_sigma
    # grow lo geometrically first, so the bisection starts from a bracket of one order of magnitude
    probe = max_sigma
    while probe > 1e-3 and epsilon(steps, sample_rate, probe / 10, delta, orders) <= target_epsilon:
        probe /= 10
    lo, hi = probe / 10, probe
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if epsilon(steps, sample_rate, mid, delta, orders) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
