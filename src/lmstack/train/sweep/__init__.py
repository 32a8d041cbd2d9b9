"""Sweeps and hyperparameter optimisation: a search space over dotted config keys, run as an Optuna study
(grid / random / TPE samplers; none / median / ASHA / Hyperband pruners) stored in SQLite or Postgres.

Usage:
    from lmstack.train.sweep import SweepConfig, run_sweep, pretrain_objective
    result = run_sweep(SweepConfig(out="runs/sweep", space={"optim.lr": "loguniform(1e-4, 1e-2)"}, n_trials=20),
                       objective=lambda trial: evaluate(trial.config, trial.report))
    result = run_sweep(SweepConfig(recipe="recipes/shakespeare_char.yaml", space=..., n_trials=20),
                       pretrain_objective("val_loss"))
"""
from lmstack.train.sweep.objectives import ReportHook, pretrain_objective
from lmstack.train.sweep.space import Param, build_config, parse_space
from lmstack.train.sweep.study import (Pruned, SweepConfig, SweepResult, TrialRun, check_sweep, open_study, run_sweep,
                                       storage_url)

__all__ = ["Param", "Pruned", "ReportHook", "SweepConfig", "SweepResult", "TrialRun", "build_config", "check_sweep",
           "open_study", "parse_space", "pretrain_objective", "run_sweep", "storage_url"]
