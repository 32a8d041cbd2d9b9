"""`lmstack sweep`: hyperparameter search over a pretrain recipe, as a resumable Optuna study.

A sweep file is a SweepConfig YAML: the recipe, fixed overrides, the space, sampler, pruner and budget. Each
trial pretrains into <out>/trials/NNNN; the sweep writes best.yaml, trials.csv, summary.json and plots into
<out>. Run the same command again and it continues the study in <out>/study.db.

Usage:
    lmstack sweep --config sweep.yaml
    # sweep.yaml
    recipe: recipes/shakespeare_char.yaml
    overrides: {train.steps: 200}
    space: {optim.lr: loguniform(1e-4, 1e-2), model.d_model: [64, 128]}
    sampler: tpe
    n_trials: 20
"""
from __future__ import annotations

from lmstack.config import ConfigCommand
from lmstack.train.sweep.objectives import pretrain_objective
from lmstack.train.sweep.study import SweepConfig, SweepResult, run_sweep


def _run(cfg: SweepConfig) -> SweepResult:
    """Search hyperparameters of a pretrain recipe with Optuna (a resumable study) and write the best config."""
    result = run_sweep(cfg, pretrain_objective(cfg.metric))
    states = [t["state"] for t in result.trials]
    print(f"sweep: {len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed); best {cfg.metric} {result.best_value} with {result.best_params}")
    print(f"best config: {result.out / 'best.yaml'}")
    return result


COMMANDS = ConfigCommand(SweepConfig, _run)
