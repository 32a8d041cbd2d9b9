"""The scaling grid: a ScalingConfig over a pretrain recipe, checked and expanded into runs before any trains.

A grid is model sizes (each a mapping of ModelConfig overrides, e.g. {d_model: 64, n_layers: 2, n_heads: 4})
crossed with FLOP budgets and/or explicit token counts:
- a budget C trains every size to D = C / (6 N) tokens (IsoFLOP: all sizes of one budget spend the same compute);
- a token count D trains every size to D tokens.
N is counted by lmstack.model.counting, either without the embedding (Kaplan et al.'s choice, the default: at these
tiny sizes the embedding table and learned positions are a large, nearly free share of the parameters) or in total
(Hoffmann et al.'s); the same N is used everywhere: in D = C / (6N), in the fit, and in the prediction.
Each run's train.steps is set to its own D (steps = D / tokens per step, rounded), so its LR schedule (cosine by
default) ends exactly at D: a schedule longer than the run would leave the LR high at the end and bias the loss up.
All other hyperparameters are the recipe's, the same for every size; warmup is `warmup_fraction` of each run.

Everything is refused before the first run, with the key named: an unknown key in a size override, an empty grid,
a non-positive budget or token count, a run too short (min_steps), and a grid with fewer runs than the law's
parameters plus 3 (8).

Usage:
    cfg = ScalingConfig(recipe="recipes/shakespeare_char.yaml", sizes=[{"d_model": 64, "n_layers": 2}, ...],
                        budgets=[1e12, 2e12])
    base, planned = plan_grid(cfg)      # [PlannedRun(name, size, tokens, budget, steps, n_params, ...), ...]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from lmstack.config import ConfigError, from_dict, read_mapping, to_dict
from lmstack.model.config import ModelConfig
from lmstack.model.counting import model_stats
from lmstack.train.pretrain import PretrainConfig
from lmstack.train.scaling.fit import LAW_PARAMS
from lmstack.train.sweep.space import field_hint, set_dotted


@dataclass
class ScalingConfig:
    out: str = "runs/scaling"
    """Directory: runs.jsonl (one row per finished run), runs/<name>/ (each pretrain run), report.json, plots."""
    recipe: str = ""
    """The base pretrain recipe (a PretrainConfig YAML) every run starts from; empty: the defaults."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed dotted keys set on the recipe for every run, e.g. {"data.batch_size": 32, "optim.lr": 0.002}."""
    data: Literal["recipe", "world"] = "recipe"
    """recipe: the recipe's own data (e.g. Tiny Shakespeare chars); world: the synthetic world's pretraining
    corpus, written once into <out>/data/world.txt and read character-level (its val split is the held-out tail)."""
    world_people: int = 2000
    """data=world: people in the world (about 2.5 kB of text each: 2000 people give ~5 MB of characters)."""
    world_seed: int = 0
    """data=world: the world's seed."""
    sizes: list[dict[str, Any]] = field(default_factory=list)
    """Model sizes, each a mapping of ModelConfig overrides, e.g. [{d_model: 64, n_layers: 2, n_heads: 4}, ...]."""
    budgets: list[float] = field(default_factory=list)
    """FLOP budgets C = 6 N D: every size is trained to D = C / (6 N) tokens (IsoFLOP curves)."""
    tokens: list[float] = field(default_factory=list)
    """Explicit token counts D: every size is trained to D tokens."""
    params: Literal["non_embedding", "total"] = "non_embedding"
    """Which parameter count is N: non_embedding (Kaplan et al.) or total (Hoffmann et al.)."""
    min_tokens_per_param: float = 0.0
    """Leave out grid points with D / N below this (sizes far from a budget's optimum); 0: keep all."""
    max_tokens_per_param: float = 0.0
    """Leave out grid points with D / N above this; 0: no upper limit."""
    warmup_fraction: float = 0.05
    """LR warmup as a fraction of each run's steps (the same rule for every size)."""
    min_steps: int = 20
    """A run shorter than this many optimizer steps is refused (too few to mean anything)."""
    predict: float = 0.0
    """K > 1: after the fit, train one run at K x the largest budget with the law's compute-optimal N*, D* (the
    nearest size of predict_sizes) and report predicted against measured loss; the issue's test uses K in 4..8."""
    predict_sizes: list[dict[str, Any]] = field(default_factory=list)
    """Candidate sizes for the prediction run (the one nearest N* in log N is used); empty: `sizes`."""
    n_boot: int = 200
    """Bootstrap refits for the intervals on alpha, beta, the frontier exponent and tokens per parameter."""
    seed: int = 0
    """Bootstrap seed (each run's training seed is the recipe's train.seed)."""
    plots: bool = True
    """Write loss_vs_flops.png, isoflop.png and frontier.png into `out`."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid, sized before training: `tokens` is what its steps will actually see."""

    name: str
    size: dict[str, Any]
    tokens: int
    steps: int
    n_params: int
    total_params: int
    non_embedding_params: int
    flops_per_token: float
    """Training FLOPs per token by lmstack.model.counting (6 N_active + the head + attention at the run's context)."""
    budget: float | None = None
    kind: str = "grid"

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.n_params * self.tokens

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens


def size_label(size: dict[str, Any]) -> str:
    """A stable, file-safe name for a size: d_model64_n_layers2_n_heads4."""
    return "_".join(f"{k}{v}" for k, v in size.items()) or "base"


def check_sizes(sizes: list[dict[str, Any]], what: str = "sizes") -> None:
    """Every key of every size override must be a ModelConfig field (not a whole section)."""
    allowed = sorted(f.name for f in dataclasses.fields(ModelConfig) if f.init)
    for i, size in enumerate(sizes):
        if not isinstance(size, dict):
            raise ConfigError(f"scaling {what}[{i}] must be a mapping of model overrides, got {size!r}")
        for key in size:
            if key not in allowed:
                raise ConfigError(f"scaling {what}[{i}]: unknown model key {key!r}; allowed: {', '.join(allowed)}")


def check_config(cfg: ScalingConfig) -> None:
    """Refuse a bad scaling config before anything runs; the message names the key."""
    if not cfg.sizes:
        raise ConfigError("scaling sizes is empty: give at least two model sizes (mappings of model overrides)")
    check_sizes(cfg.sizes)
    check_sizes(cfg.predict_sizes, "predict_sizes")
    if not cfg.budgets and not cfg.tokens:
        raise ConfigError("scaling grid is empty: give budgets (FLOPs, IsoFLOP) and/or tokens (token counts)")
    for name in ("budgets", "tokens"):
        for i, value in enumerate(getattr(cfg, name)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"scaling {name}[{i}]={value!r} must be a positive number")
    if cfg.predict and not cfg.predict > 1:
        raise ConfigError(f"scaling predict={cfg.predict} must be 0 (off) or a factor K > 1 (the issue uses 4..8)")
    if cfg.predict and not cfg.budgets:
        raise ConfigError("scaling predict needs budgets: the prediction run is at predict x the largest budget")
    if cfg.min_tokens_per_param < 0 or cfg.max_tokens_per_param < 0:
        raise ConfigError("scaling min_tokens_per_param and max_tokens_per_param must be 0 or more")
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ConfigError(f"scaling warmup_fraction={cfg.warmup_fraction} must be in [0, 1)")
    if cfg.min_steps < 1:
        raise ConfigError(f"scaling min_steps={cfg.min_steps} must be at least 1")
    if cfg.n_boot < 10:
        raise ConfigError(f"scaling n_boot={cfg.n_boot} must be at least 10")
    if cfg.data == "world" and cfg.world_people < 1:
        raise ConfigError(f"scaling world_people={cfg.world_people} must be at least 1")
    for key in cfg.overrides:
        try:
            field_hint(PretrainConfig, key)
        except ConfigError as e:
            raise ConfigError(f"scaling overrides: {e}".replace("sweep space: ", "")) from None


def base_mapping(cfg: ScalingConfig, data_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe mapping with the fixed overrides (and the data the scaling config chose) set."""
    base = read_mapping(cfg.recipe) if cfg.recipe else {}
    for key, value in {**cfg.overrides, **(data_overrides or {})}.items():
        base = set_dotted(base, key, value)
    return base


def run_config(base: dict[str, Any], size: dict[str, Any], steps: int, warmup_fraction: float,
               out: str) -> PretrainConfig:
    """The PretrainConfig of one run: the base with the size's model overrides, its steps and warmup."""
    data = base
    for key, value in size.items():
        data = set_dotted(data, f"model.{key}", value)
    data = set_dotted(data, "train.steps", steps)
    data = set_dotted(data, "schedule.warmup_steps", int(round(warmup_fraction * steps)))
    data = set_dotted(data, "out", out)
    return from_dict(PretrainConfig, data)


def config_hash(pcfg: PretrainConfig) -> str:
    """A digest of a run's whole config except its directory: a finished row counts only for the same config."""
    data = to_dict(pcfg)
    data.pop("out", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokens_per_step(pcfg: PretrainConfig) -> int:
    return pcfg.data.batch_size * pcfg.data.seq_len * pcfg.train.grad_accum


def count(pcfg: PretrainConfig, params: str) -> tuple[int, int, int, float]:
    """(N as chosen, total, non-embedding, training FLOPs per token at the run's context) of a run's model."""
    stats = model_stats(pcfg.model, context=pcfg.data.seq_len)
    non_emb = stats.total_params - stats.embedding_params
    return (non_emb if params == "non_embedding" else stats.total_params), stats.total_params, non_emb, \
        stats.train_flops_per_token


def plan_run(cfg: ScalingConfig, base: dict[str, Any], size: dict[str, Any], tokens: float | None = None,
             budget: float | None = None, kind: str = "grid", window: bool = False
             ) -> tuple[PlannedRun, PretrainConfig] | None:
    """Size one run (to `tokens`, or to budget / (6 N)) and build its config; a bad size is named. With `window`,
    a point outside the tokens-per-param window is left out (None) before its length is checked."""
    label = size_label(size)
    try:
        probe = run_config(base, size, 1, 0.0, "")
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"scaling size {label}: the recipe with this size is refused: {e}") from None
    n, total, non_emb, fpt = count(probe, cfg.params)
    target = tokens if tokens is not None else budget / (6.0 * n)
    if window and not _keep(cfg, target / n):
        return None
    per_step = tokens_per_step(probe)
    steps = max(1, int(round(target / per_step)))
    if steps < cfg.min_steps:
        raise ConfigError(f"scaling run {label} at {target:.3g} tokens is only {steps} steps of {per_step} tokens "
                          f"(min_steps={cfg.min_steps}); raise the budget/tokens, lower data.batch_size, or leave "
                          f"the point out with max_tokens_per_param/min_tokens_per_param")
    name = f"{'' if kind == 'grid' else kind + '_'}{label}_D{steps * per_step}"
    pcfg = run_config(base, size, steps, cfg.warmup_fraction, str(Path(cfg.out) / "runs" / name))
    return PlannedRun(name=name, size=dict(size), tokens=steps * per_step, steps=steps, n_params=n,
                      total_params=total, non_embedding_params=non_emb, flops_per_token=fpt, budget=budget,
                      kind=kind), pcfg


def _keep(cfg: ScalingConfig, ratio: float) -> bool:
    """Whether D / N = ratio lies in the tokens-per-param window."""
    return ratio >= cfg.min_tokens_per_param and (not cfg.max_tokens_per_param or ratio <= cfg.max_tokens_per_param)


def plan_grid(cfg: ScalingConfig, data_overrides: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], list[tuple[PlannedRun, PretrainConfig]]]:
    """(base mapping, the grid's runs with their configs), refusing a bad or too small grid before any run."""
    check_config(cfg)
    base = base_mapping(cfg, data_overrides)
    try:
        from_dict(PretrainConfig, base)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"scaling recipe {cfg.recipe or '(defaults)'} with overrides is refused: {e}") from None
    planned: dict[str, tuple[PlannedRun, PretrainConfig]] = {}
    for size in cfg.sizes:
        points = [dict(budget=float(c)) for c in cfg.budgets] + [dict(tokens=float(d)) for d in cfg.tokens]
        for point in points:
            planned_run = plan_run(cfg, base, size, window=True, **point)
            if planned_run is not None:  # a budget and a token count can name the same run: keep one
                planned.setdefault(planned_run[0].name, planned_run)
    runs = list(planned.values())
    need = LAW_PARAMS + 3
    if len(runs) < need:
        raise ConfigError(f"scaling grid has {len(runs)} runs; the Chinchilla law has {LAW_PARAMS} parameters and a "
                          f"fit needs at least {need} runs: add sizes, budgets or tokens (or widen the "
                          f"tokens-per-param window)")
    if len({r.n_params for r, _ in runs}) < 2:
        raise ConfigError(f"scaling sizes give {len({r.n_params for r, _ in runs})} distinct parameter counts among "
                          f"the kept runs; the fit needs at least two")
    return base, runs
