"""`lmstack sweep`: hyperparameter search over a pretrain recipe, as a resumable Optuna study.

A sweep file is a SweepConfig YAML: the recipe, fixed overrides, the space, sampler, pruner and budget. Each
trial pretrains into <out>/trials/NNNN; the sweep writes best.yaml, trials.csv, summary.json and plots into
<out>. Run the same command again and it continues the study in <out>/study.db.

With --parallel N, N worker processes (`python -m lmstack.cli sweep`) share the study, each taking the next
trial until the budget is spent (workers starting a trial at the same moment may overshoot n_trials by up to
N - 1; a grid may visit a point twice); this process then writes the outputs and plots from the study.

Usage:
    lmstack sweep --config sweep.yaml
    lmstack sweep --config sweep.yaml --parallel 2
    # sweep.yaml
    recipe: recipes/shakespeare_char.yaml
    overrides: {train.steps: 200}
    space: {optim.lr: loguniform(1e-4, 1e-2), model.d_model: [64, 128]}
    sampler: tpe
    n_trials: 20
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import subprocess
import sys

from lmstack.config import ConfigCommand, save_config
from lmstack.errors import LmstackError
from lmstack.train.pretrain import PretrainConfig
from lmstack.train.sweep.objectives import pretrain_objective
from lmstack.train.sweep.study import SweepConfig, SweepResult, check_sweep, open_study, run_sweep

WORKER_SEED_STRIDE = 7919  # worker i samples with seed + stride * (i + 1): no worker replays another's stream


def run_workers(cfg: SweepConfig) -> None:
    """Run cfg.parallel worker processes on the sweep's shared study and wait for them all."""
    _, params = check_sweep(cfg, PretrainConfig)  # refuse bad input here, once, before any worker starts
    open_study(cfg, params)  # create the tables and the study first: workers racing to do it collide
    paths = []
    for i in range(cfg.parallel):
        # each worker its own sampler seed: with one seed, workers that start together sample the same points
        paths.append(Path(cfg.out) / f"sweep-worker{i}.yaml")
        save_config(replace(cfg, parallel=1, plots=False, seed=cfg.seed + WORKER_SEED_STRIDE * (i + 1)), paths[-1])
    workers = [subprocess.Popen([sys.executable, "-m", "lmstack.cli", "sweep", "--config", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for path in paths]
    failed = []
    for i, w in enumerate(workers):
        output = w.communicate()[0]
        if w.returncode != 0:
            failed.append(f"worker {i} exited with {w.returncode}: {output.strip()[-800:]}")
    if failed:
        raise LmstackError("sweep workers failed:\n" + "\n".join(failed))


def _run(cfg: SweepConfig) -> SweepResult:
    """Search hyperparameters of a pretrain recipe with Optuna (a resumable study) and write the best config."""
    if cfg.parallel > 1:
        run_workers(cfg)
    # With workers, the budget is spent by now: this call only reads the study and writes the outputs.
    result = run_sweep(replace(cfg, parallel=1), pretrain_objective(cfg.metric))
    states = [t["state"] for t in result.trials]
    print(f"sweep: {len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed); best {cfg.metric} {result.best_value} with {result.best_params}")
    print(f"best config: {result.out / 'best.yaml'}")
    return result


COMMANDS = ConfigCommand(SweepConfig, _run)
