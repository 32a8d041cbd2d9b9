"""Best-of-n selection curves: how a policy's gold score moves as a proxy reward picks the best of n samples.

Best-of-n (BoN) draws n completions per prompt and keeps the one a proxy reward (a reward model) scores highest.
Its distance from the policy is analytic (Stiennon et al. 2020; Gao et al. 2022, "Scaling laws for reward model
over-optimization"):

    KL_bon(n) = log n - (n - 1) / n

so a curve of gold score against KL_bon shows over-optimisation without training anything: the gold score of the
proxy's pick rises while the proxy tracks the gold, then falls once the proxy's errors dominate the pick.

One pool of N samples per prompt serves every n <= N, two ways:
- nested: the pick among the *first* n samples of the pool (Gao et al.; one draw per n, so curves are
  consistent across n but each point carries the noise of one subset);
- expected: the exact mean over *all* n-subsets of the pool (rank the pool by proxy; the sample of rank i,
  counted from the lowest, is a subset's pick with probability C(i-1, n-1) / C(N, n)). Unbiased, lower variance.
The oracle (gold picks its own best: pass@n for a 0/1 gold) is the same with proxy = gold. Ties in the proxy go
to the earlier sample, in both estimators.

Usage:
    from lmstack.align.best_of_n import kl_bon, best_of_n, bon_curve, peak_n
    kl_bon(16)                                                # 2.0351
    picked = best_of_n(proxy, gold, n=4)                      # proxy, gold: (P, N) -> {"gold": (P,), "proxy": (P,)}
    rows = bon_curve(proxy, gold, [1, 2, 4, 8], estimator="expected")
    rows[0]                                                   # {"n": 1, "kl": 0.0, "gold": ..., "gold_stderr": ...,
                                                              #  "proxy": ..., "proxy_stderr": ..., "prompts": P}
    peak_n(rows)                                              # the n where the gold score is highest
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from lmstack.errors import LmstackError

ESTIMATORS = ("nested", "expected")


def kl_bon(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n, in nats (0 at n = 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LmstackError(f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def _check(proxy: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    proxy, gold = torch.as_tensor(proxy, dtype=torch.float64), torch.as_tensor(gold, dtype=torch.float64)
    if proxy.dim() != 2 or proxy.shape != gold.shape or proxy.numel() == 0:
        raise LmstackError(f"proxy and gold must be the same non-empty (prompts, samples) shape, got "
                           f"{tuple(proxy.shape)} and {tuple(gold.shape)}")
    if not (torch.isfinite(proxy).all() and torch.isfinite(gold).all()):
        raise LmstackError("proxy and gold scores must be finite (a NaN sample has no place in a best-of-n pool)")
    return proxy, gold


def _check_n(n: int, pool: int) -> None:
    kl_bon(n)
    if n > pool:
        raise LmstackError(f"best-of-{n} needs at least {n} samples per prompt, the pool has {pool}")


def _ascending(scores: torch.Tensor) -> torch.Tensor:
    """(P, N) -> (P, N) sample indices from the lowest score to the highest, equal scores with the earlier
    sample last (it wins the tie). A stable sort of the reversed row keeps equal scores latest-first."""
    n = scores.shape[1]
    return (n - 1) - torch.argsort(scores.flip(1), dim=1, stable=True)


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int, estimator: str = "nested") -> dict[str, torch.Tensor]:
    """Per prompt, the gold and proxy score of the proxy's pick among n samples: {"gold": (P,), "proxy": (P,)}.

    proxy, gold: (P, N) scores of the same N samples of P prompts. estimator "nested" picks among the first n
    samples; "expected" averages the pick over every n-subset of the N (see the module docstring)."""
    proxy, gold = _check(proxy, gold)
    _check_n(n, proxy.shape[1])
    if estimator == "nested":
        idx = torch.argmax(proxy[:, :n], dim=1).unsqueeze(1)  # the first of equal maxima (torch documents it)
        return {"gold": gold[:, :n].gather(1, idx).squeeze(1), "proxy": proxy[:, :n].gather(1, idx).squeeze(1)}
    if estimator != "expected":
        raise LmstackError(f"unknown best-of-n estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    pool = proxy.shape[1]
    order = _ascending(proxy)
    weights = torch.tensor([math.comb(i, n - 1) for i in range(pool)], dtype=torch.float64) / math.comb(pool, n)
    return {"gold": (gold.gather(1, order) * weights).sum(1), "proxy": (proxy.gather(1, order) * weights).sum(1)}


def _mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    sd = float(x.std(unbiased=True)) if x.numel() > 1 else 0.0
    return float(x.mean()), sd / math.sqrt(x.numel())


def bon_curve(proxy: torch.Tensor, gold: torch.Tensor, ns: Sequence[int], estimator: str = "nested") -> list[dict]:
    """One row per n: {"n", "kl", "gold", "gold_stderr", "proxy", "proxy_stderr", "gain", "gain_stderr",
    "prompts"}: means over prompts with their standard errors. gain is gold(n) - gold(1) per prompt (paired, so
    its stderr is smaller than the two points' own)."""
    if not ns:
        raise LmstackError("bon_curve needs at least one n")
    base = best_of_n(proxy, gold, 1, estimator)["gold"]
    rows = []
    for n in ns:
        pick = best_of_n(proxy, gold, n, estimator)
        g, g_se = _mean_stderr(pick["gold"])
        p, p_se = _mean_stderr(pick["proxy"])
        d, d_se = _mean_stderr(pick["gold"] - base)
        rows.append({"n": n, "kl": kl_bon(n), "gold": g, "gold_stderr": g_se, "proxy": p, "proxy_stderr": p_se,
                     "gain": d, "gain_stderr": d_se, "prompts": int(pick["gold"].numel())})
    return rows


def peak_n(rows: Sequence[dict], key: str = "gold") -> int:
    """The n of the row with the highest `key` (the smallest such n on ties)."""
    if not rows:
        raise LmstackError("peak_n needs a non-empty curve")
    best = max(r[key] for r in rows)
    return min(r["n"] for r in rows if r[key] == best)
