"""Scaling laws (issue 23): Chinchilla fits, the compute-optimal frontier and their bootstrap intervals (fit.py).

Usage:
    from lmstack.train.scaling import Run, fit_chinchilla
    law = fit_chinchilla([Run(n_params, tokens, loss), ...]); n_opt, d_opt = law.optimal(flops)
"""
from lmstack.train.scaling.fit import (ChinchillaLaw, Run, bootstrap, fit_chinchilla, frontier_minima,
                                       isoflop_parabolas)

__all__ = ["ChinchillaLaw", "Run", "bootstrap", "fit_chinchilla", "frontier_minima", "isoflop_parabolas"]
