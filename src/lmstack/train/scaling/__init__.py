"""Scaling laws (issue 23): Chinchilla fits, the compute-optimal frontier and their bootstrap intervals (fit.py);
the `lmstack scaling` grid that trains sizes x budgets and tests the fit on a larger run (grid.py, runner.py,
plots.py, commands.py).

Usage:
    from lmstack.train.scaling import Run, fit_chinchilla
    law = fit_chinchilla([Run(n_params, tokens, loss), ...]); n_opt, d_opt = law.optimal(flops)
    from lmstack.train.scaling import ScalingConfig, run_scaling
    report = run_scaling(ScalingConfig(recipe="recipes/shakespeare_char.yaml", sizes=[...], budgets=[...]))
"""
from lmstack.train.scaling.fit import (ChinchillaLaw, Run, bootstrap, fit_chinchilla, frontier_minima,
                                       isoflop_parabolas)
from lmstack.train.scaling.grid import PlannedRun, ScalingConfig, check_config, plan_grid
from lmstack.train.scaling.runner import run_scaling

__all__ = ["ChinchillaLaw", "PlannedRun", "Run", "ScalingConfig", "bootstrap", "check_config", "fit_chinchilla",
           "frontier_minima", "isoflop_parabolas", "plan_grid", "run_scaling"]
