"""Run a sweep: an Optuna study over a checked search space, stored in a database so that it resumes.

The study lives in SQLite by default (sqlite:///<out>/study.db): run the same sweep again over the same `out`
and it continues the same study, up to `n_trials` finished trials in all (complete, pruned or failed). Trials a
crashed process left RUNNING are marked failed once their heartbeat is older than `grace_period_s`. Several
machines can share one study through a database server; the storage URL forms are SQLAlchemy's:
    sqlite:///runs/sweep/study.db                           (the default; a file beside the outputs)
    postgresql+psycopg://user:password@host:5432/dbname     (psycopg 3, the `rag` extra installs it)
    postgresql://user:password@host:5432/dbname             (psycopg2)
    memory                                                  (in this process only; no resume)

A trial calls `objective(trial)` with a TrialRun: its built config (with `out` set to <out>/trials/NNNN when the
config has an `out` field that the space does not search), its sampled params, and `report(step, value)`, which
records an intermediate value and raises Pruned when the pruner stops the trial. The objective returns the
final value (lower is better unless direction is maximize). A trial that raises is recorded FAILED with its error,
and the sweep goes on.

Outputs in `out`: best.yaml (the best trial's whole config), trials.csv (one row per trial: number, state, value,
seconds, params, error) and summary.json, each written atomically after every trial; at the end the plots
history.png, params.png and importance.png (lmstack.train.sweep.plots).

Usage:
    from lmstack.train.sweep import SweepConfig, run_sweep
    cfg = SweepConfig(out="runs/sweep", space={"optim.lr": "loguniform(1e-4, 1e-2)"}, sampler="tpe",
                      pruner="median", n_trials=20)
    result = run_sweep(cfg, lambda t: train_and_eval(t.config, t.report))
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
import hashlib
import io
import json
import math
from pathlib import Path
import time
import warnings
from typing import Any, Callable, Literal

import yaml

from lmstack.config import ConfigError, atomic_write_text, read_mapping, to_dict
from lmstack.errors import LmstackError
from lmstack.train.sweep.plots import plot_sweep
from lmstack.train.sweep.space import Param, build_config, field_hint, grid_space, parse_space, set_dotted, suggest

_STORAGE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+")


class Pruned(Exception):
    """Raised by TrialRun.report when the pruner stops the trial; let it propagate out of the objective."""


@dataclass
class SweepConfig:
    out: str = "runs/sweep"
    """Sweep directory: study.db (by default), best.yaml, trials.csv, summary.json, trials/NNNN/."""
    recipe: str = ""
    """The base run config (a recipe YAML) that each trial's sampled values are set on; empty: the defaults."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed dotted keys set on the recipe for every trial, e.g. {"train.steps": 200}."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> loguniform(a, b) | uniform(a, b) | int(a, b) | [choice, ...]."""
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    """grid: every combination of the lists (and int ranges); random; tpe: Optuna's Tree-structured Parzen Estimator."""
    pruner: Literal["none", "median", "asha", "hyperband"] = "none"
    """Stop trials early on the reported values: median (below the median of earlier trials at the same step),
    asha (asynchronous successive halving), hyperband (several ASHA brackets)."""
    n_trials: int = 0
    """Finished trials in the study in all, across resumes; 0 means the grid's size (grid sampler only)."""
    metric: str = "val_loss"
    """`lmstack sweep`: the pretrain summary's value to optimise (val_loss, val_bpb, final_loss, ...)."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether a lower (a loss) or a higher (an accuracy) objective value is better."""
    seed: int = 0
    """Sampler seed."""
    storage: str = ""
    """Study database URL; empty means sqlite:///<out>/study.db. See the module docstring for Postgres."""
    study_name: str = "sweep"
    """The study's name inside the storage (one database can hold several)."""
    n_startup_trials: int = 5
    """TPE: random trials before the model; median: trials finished before any pruning."""
    warmup_steps: int = 0
    """median: steps of each trial never pruned."""
    min_resource: int = 1
    """asha/hyperband: the step of the first rung."""
    max_resource: int = 0
    """hyperband: the last step a trial reports (0: learned from the first finished trial)."""
    reduction_factor: int = 3
    """asha/hyperband: keep 1/reduction_factor of the trials at each rung."""
    parallel: int = 1
    """`lmstack sweep`: trials at once, each in its own worker process sharing the study (not with storage memory)."""
    plots: bool = True
    """Draw history.png, params.png and importance.png into `out` when the sweep ends."""
    grace_period_s: int = 600
    """A RUNNING trial whose heartbeat is older than this (its process died) is marked failed on resume."""


@dataclass
class TrialRun:
    """What the objective gets: the trial's config and params, and report(step, value) for pruning."""

    number: int
    config: Any
    params: dict[str, Any]
    out: Path
    _trial: Any = dataclasses.field(repr=False, default=None)

    def report(self, step: int, value: float) -> None:
        """Record the value at `step` (a loss on the eval set, say); raise Pruned if the trial should stop."""
        if self._trial is None:
            return
        value = float(value)
        if not math.isfinite(value):
            raise LmstackError(f"trial {self.number}: reported value {value} at step {step} is not finite")
        self._trial.report(value, int(step))
        if self._trial.should_prune():
            raise Pruned(f"trial {self.number} pruned at step {step} (value {value:.6g})")


@dataclass
class SweepResult:
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Any
    trials: list[dict[str, Any]]
    out: Path


def storage_url(cfg: SweepConfig) -> str | None:
    """The study's database URL (None: in memory), checked."""
    if cfg.storage == "memory":
        return None
    url = cfg.storage or f"sqlite:///{Path(cfg.out) / 'study.db'}"
    if not url.startswith(_STORAGE_SCHEMES):
        raise ConfigError(f"sweep storage {url!r} is not a database URL; give sqlite:///path/study.db, "
                          f"postgresql+psycopg://user:password@host:5432/dbname or 'memory'")
    return url


def _sampler(optuna: Any, cfg: SweepConfig, params: list[Param], seed: int | None = None) -> Any:
    seed = cfg.seed if seed is None else seed
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(params), seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials)


def _pruner(optuna: Any, cfg: SweepConfig) -> Any:
    p = optuna.pruners
    if cfg.pruner == "median":
        return p.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.warmup_steps)
    if cfg.pruner == "asha":
        return p.SuccessiveHalvingPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "hyperband":
        return p.HyperbandPruner(min_resource=cfg.min_resource, max_resource=cfg.max_resource or "auto",
                                 reduction_factor=cfg.reduction_factor)
    return p.NopPruner()


def _storage(optuna: Any, cfg: SweepConfig) -> Any:
    url = storage_url(cfg)
    if url is None:
        return None
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # The heartbeat lets a resumed sweep (or another worker) fail the trials of a process that died.
    with warnings.catch_warnings():  # the heartbeat is marked experimental; it is what resume relies on
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, cfg.grace_period_s // 4),
                                          grace_period=cfg.grace_period_s)


def check_sweep(cfg: SweepConfig, config_cls: type) -> tuple[dict, list[Param]]:
    """(base mapping, checked params) of a sweep, refusing bad input before any trial starts."""
    if cfg.parallel < 1:
        raise ConfigError(f"sweep parallel={cfg.parallel} must be at least 1")
    if cfg.parallel > 1 and cfg.storage == "memory":
        raise ConfigError("sweep parallel > 1 needs a database the workers share; storage 'memory' is one process's")
    for name in ("n_trials", "n_startup_trials", "warmup_steps", "min_resource", "max_resource"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"sweep {name}={getattr(cfg, name)} must be 0 or more")
    if cfg.reduction_factor < 2:
        raise ConfigError(f"sweep reduction_factor={cfg.reduction_factor} must be at least 2")
    base = read_mapping(cfg.recipe) if cfg.recipe else {}
    for key in cfg.overrides:
        field_hint(config_cls, key)  # an unknown override key is named, like a space key
    fixed = base
    for key, value in cfg.overrides.items():
        fixed = set_dotted(fixed, key, value)
    try:
        build_config(config_cls, fixed, {})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sweep recipe {cfg.recipe or '(defaults)'} with overrides is refused: {e}") from None
    params = parse_space(cfg.space, config_cls, fixed)
    if cfg.sampler != "grid" and cfg.n_trials == 0:
        raise ConfigError(f"sweep n_trials must be above 0 for the {cfg.sampler} sampler")
    if cfg.sampler == "grid":
        grid_space(params)
    storage_url(cfg)
    return fixed, params


def _importances(optuna: Any, study: Any, params: list[Param], n_complete: int) -> dict[str, float] | None:
    """{key: importance} by Optuna's default evaluator, or None when it cannot say (one key, few trials)."""
    if len(params) < 2 or n_complete < 3:
        return None
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):  # e.g. every complete trial has the same params: nothing to attribute
        return None


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "seconds": seconds,
                     "params": dict(t.params), "error": t.user_attrs.get("error", "")})
    return rows


def _write_outputs(out: Path, study: Any, rows: list[dict], params: list[Param], best_config: Any) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [p.key for p in params]
    writer.writerow(["number", "state", "value", "seconds", *keys, "error"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r["value"] is None else r["value"],
                         "" if r["seconds"] is None else f"{r['seconds']:.3f}",
                         *[r["params"].get(k, "") for k in keys], r["error"]])
    atomic_write_text(out / "trials.csv", buf.getvalue())
    done = [r for r in rows if r["state"] == "COMPLETE"]
    best = {"value": study.best_value, "params": study.best_params, "number": study.best_trial.number} \
        if done else None
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    atomic_write_text(out / "summary.json", json.dumps(
        {"study": study.study_name, "direction": study.direction.name.lower(), "best": best, "counts": counts,
         "trials": rows}, indent=2, default=str) + "\n")
    if best_config is not None:
        atomic_write_text(out / "best.yaml", yaml.safe_dump(to_dict(best_config), sort_keys=False))


def open_study(cfg: SweepConfig, params: list[Param]) -> tuple[Any, Any, Any]:
    """(optuna, storage or None, study): the sweep's study, created or loaded, checked against the sweep. Call it
    once before starting worker processes, so that they never race to create the database tables."""
    # lazy: optional extra (optuna, the `sweep` extra); lmstack imports without it
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    storage = _storage(optuna, cfg)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, load_if_exists=True,
                                sampler=_sampler(optuna, cfg, params), pruner=_pruner(optuna, cfg),
                                direction=cfg.direction)
    space = json.dumps(cfg.space, sort_keys=True)
    held = study.user_attrs.get("space")
    if held is None:
        study.set_user_attr("space", space)
    elif held != space:
        raise LmstackError(f"study {cfg.study_name!r} in {storage_url(cfg) or 'memory'} already holds a sweep over "
                           f"another space ({held}); give a new out, storage or study_name")
    if study.direction.name.lower() != cfg.direction:
        raise LmstackError(f"study {cfg.study_name!r} was created to {study.direction.name.lower()}, "
                           f"not {cfg.direction}")
    held_trials = len(study.get_trials(deepcopy=False))
    if held_trials:
        # A sampler seeded afresh replays its random stream: a resumed random (or TPE startup) sweep would
        # sample the first run's points again. Mix the trials already held into the seed: still reproducible, and
        # unlike seed + held_trials it never replays the stream of a sweep with a neighbouring seed.
        study.sampler = _sampler(optuna, cfg, params, seed=resume_seed(cfg.seed, held_trials))
    return optuna, storage, study


def resume_seed(seed: int, held_trials: int) -> int:
    """The sampler seed of a study resumed with `held_trials` trials: a 32-bit hash of both numbers."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{held_trials}".encode()).digest()[:4], "little")


def run_sweep(cfg: SweepConfig, objective: Callable[[TrialRun], float], config_cls: type | None = None,
              log: Callable[[str], Any] = print) -> SweepResult:
    """Run (or resume) the sweep `cfg` over `config_cls` (PretrainConfig by default) with `objective`."""
    if config_cls is None:
        # lazy: heavy (torch, through the trainer); a sweep over another config class never needs it
        from lmstack.train.pretrain import PretrainConfig
        config_cls = PretrainConfig
    base, params = check_sweep(cfg, config_cls)
    optuna, storage, study = open_study(cfg, params)
    out = Path(cfg.out)
    total = cfg.n_trials or math.prod(len(v) for v in grid_space(params).values())
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    has_out = "out" in {f.name for f in dataclasses.fields(config_cls)} and "out" not in cfg.space

    def one_trial(trial: Any) -> float:
        values = {p.key: suggest(trial, p) for p in params}
        if has_out:
            values.setdefault("out", str(out / "trials" / f"{trial.number:04d}"))
        run = TrialRun(trial.number, build_config(config_cls, base, values), dict(trial.params),
                       out / "trials" / f"{trial.number:04d}", trial)
        start = time.perf_counter()
        try:
            value = float(objective(run))
        except Pruned as e:
            log(f"trial {trial.number}: {e}")
            raise optuna.TrialPruned(str(e)) from None
        except Exception as e:  # a crashed trial is recorded FAILED; the sweep goes on (optimize's catch)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            log(f"trial {trial.number} failed: {type(e).__name__}: {e}")
            raise
        if not math.isfinite(value):
            trial.set_user_attr("error", f"objective returned {value}")
            raise LmstackError(f"trial {trial.number}: objective returned {value}")
        log(f"trial {trial.number}: {value:.6g} in {time.perf_counter() - start:.1f}s {trial.params}")
        return value

    def after_trial(study: Any, _trial: Any) -> None:
        rows = _trial_rows(study)
        _write_outputs(out, study, rows, params, None)
        if sum(r["state"] in {s.name for s in finished} for r in rows) >= total:
            study.stop()  # several workers on one study: whoever sees the budget spent stops

    if storage is not None:  # trials of a process that died: FAIL, before counting (experimental in Optuna)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    already = sum(t.state in finished for t in study.get_trials(deepcopy=False))
    remaining = max(total - already, 0)
    if already:
        log(f"sweep: resuming study {cfg.study_name!r} with {already} finished trials, {remaining} to go")
    if remaining:
        study.optimize(one_trial, n_trials=remaining, catch=(Exception,), callbacks=[after_trial])
    rows = _trial_rows(study)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best_config = None
    if complete:
        best = study.best_trial
        values = dict(best.params)
        if has_out:
            values.setdefault("out", str(out / "trials" / f"{best.number:04d}"))
        best_config = build_config(config_cls, base, values)
    _write_outputs(out, study, rows, params, best_config)
    if cfg.plots:
        plot_sweep(rows, params, out, cfg.direction, _importances(optuna, study, params, len(complete)))
    return SweepResult(study.best_value if complete else None, dict(study.best_params) if complete else {},
                       best_config, rows, out)
