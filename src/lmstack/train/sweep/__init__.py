"""Sweeps and hyperparameter optimisation: a search space over dotted config keys, run as an Optuna study
(grid / random / TPE samplers; none / median / ASHA / Hyperband pruners) stored in SQLite or Postgres.

Usage:
    from lmstack.train.sweep import SweepConfig, run_sweep, parse_space
    result = run_sweep(SweepConfig(out="runs/sweep", space={"optim.lr": "loguniform(1e-4, 1e-2)"}, n_trials=20),
                       objective=lambda trial: evaluate(trial.config, trial.report))
"""
from lmstack.train.sweep.space import Param, build_config, parse_space
from lmstack.train.sweep.study import Pruned, SweepConfig, SweepResult, TrialRun, check_sweep, run_sweep, storage_url

__all__ = ["Param", "Pruned", "SweepConfig", "SweepResult", "TrialRun", "build_config", "check_sweep",
           "parse_space", "run_sweep", "storage_url"]
