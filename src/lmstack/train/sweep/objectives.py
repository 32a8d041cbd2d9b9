"""Ready-made sweep objectives over lmstack's own stages.

`pretrain_objective` trains each trial's PretrainConfig with lmstack.train.pretrain (into the trial's own
directory, <sweep out>/trials/NNNN) and returns a metric of the run's summary, `val_loss` by default. With
train.eval_every > 0 it passes pretrain() a `ReportHook`, the Trainer hook that evaluates and reports a validation
metric every eval_every steps, so the pruner can stop a run midway; the trainer's own mid-run evals are then
switched off for that run (the hook logs its evals to metrics.jsonl instead), so no eval is computed twice.

Usage:
    from lmstack.train.sweep import SweepConfig, run_sweep
    from lmstack.train.sweep.objectives import pretrain_objective
    run_sweep(SweepConfig(recipe="recipes/shakespeare_char.yaml", space={"optim.lr": "loguniform(1e-4, 1e-2)"},
                          n_trials=10, out="runs/sweep"), pretrain_objective("val_loss"))
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from lmstack.errors import LmstackError
from lmstack.train.sweep.study import TrialRun


def pretrain_objective(metric: str = "val_loss", log: Callable[[str], Any] | None = None
                       ) -> Callable[[TrialRun], float]:
    """An objective that pretrains the trial's config and returns summary[metric] (reported at the last step)."""

    def objective(trial: TrialRun) -> float:
        # lazy: heavy (torch, the whole trainer); a sweep over an analytic objective never needs it
        from lmstack.train.pretrain import pretrain

        cfg = trial.config
        every = cfg.train.eval_every
        # evaluated mid-run, the trial can be pruned early (median / ASHA); without evals only the end reports
        hooks = [ReportHook(trial, metric, every=every)] if every > 0 and metric.startswith("val_") else []
        if hooks:  # the hook evaluates (and logs) every eval_every steps: the trainer would repeat each eval
            cfg = replace(cfg, train=replace(cfg.train, eval_every=0))
        summary = pretrain(cfg, log=log or (lambda _: None), hooks=hooks)
        if metric not in summary or summary[metric] is None:
            have = ", ".join(k for k, v in summary.items() if isinstance(v, (int, float)))
            raise LmstackError(f"sweep metric {metric!r} is not in the pretrain summary (it has: {have}); "
                               f"give data with a validation split for val_* metrics")
        value = float(summary[metric])
        trial.report(int(summary.get("steps") or 0), value)
        return value

    return objective


class ReportHook:
    """A Trainer hook that evaluates every `every` steps and reports `metric` to the trial; the Pruned it raises
    when the pruner says stop ends the run (Trainer.fit lets it propagate)."""

    def __init__(self, trial: TrialRun, metric: str = "val_loss", every: int = 100):
        if every < 1:
            raise LmstackError(f"ReportHook every={every} must be at least 1")
        self.trial, self.metric, self.every = trial, metric, every

    def after_step(self, trainer: Any) -> dict[str, float]:
        if trainer.step % self.every:
            return {}
        last = getattr(getattr(trainer, "cfg", None), "steps", None)
        if last is not None and trainer.step >= last:
            return {}  # the last step: the trainer's final eval measures it, and the objective reports that
        val = trainer.evaluate()
        if self.metric not in val:
            raise LmstackError(f"sweep metric {self.metric!r} is not among the trainer's eval metrics "
                               f"({', '.join(val) or 'none: no validation data'})")
        metrics = getattr(trainer, "metrics", None)
        if metrics:  # metrics.jsonl keeps its validation rows, as when the trainer evaluates itself
            metrics.log(trainer.step, val)
        self.trial.report(trainer.step, val[self.metric])
        return {}

    def state_dict(self) -> dict:
        return {}  # nothing to resume: the trial's reports live in the study

    def load_state_dict(self, state: dict) -> None:
        pass
