"""Run a scaling grid, fit it, and test the fit on one larger run: what `lmstack scaling` does.

1. The grid (grid.py) is planned and checked in full before anything trains.
2. Each run pretrains into <out>/runs/<name>/; when it finishes, its row (N, tokens, FLOPs, val loss, seconds,
   epochs of the training split) is appended to <out>/runs.jsonl, the whole file rewritten atomically. Run the
   same command again and every run whose row is there with the same config is skipped; a row whose run config
   changed since is refused, not silently reused.
3. The fit (fit.py): Chinchilla's law (approach 3) on the grid's val losses, the compute-optimal frontier from
   the minima (approach 1) and from IsoFLOP parabolas (approach 2), and bootstrap intervals.
4. With `predict: K`, one run at K x the largest budget with the law's N* (the candidate size nearest in log N)
   and D = K C / (6 N): the law's loss at that N and D against the measured val loss.
5. report.json and the plots (plots.py) go into <out>.

Usage:
    from lmstack.train.scaling.runner import run_scaling
    report = run_scaling(cfg)                  # cfg: a ScalingConfig
    report = run_scaling(cfg, train=my_train)  # my_train(PretrainConfig) -> {"val_loss": ..., ...}
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import time
from typing import Any, Callable

import numpy as np

from lmstack.config import atomic_write_text, to_dict
from lmstack.data.shards import ShardSet
from lmstack.errors import LmstackError
from lmstack.eval.task import read_jsonl
from lmstack.tokenizer import train_tokenizer
from lmstack.train.pretrain import PretrainConfig, pretrain
from lmstack.train.scaling.fit import ChinchillaLaw, Run, bootstrap, fit_chinchilla, frontier_minima, isoflop_parabolas
from lmstack.train.scaling.grid import (PlannedRun, ScalingConfig, config_hash, count, plan_grid, plan_run,
                                        run_config)
from lmstack.train.scaling.plots import plot_scaling
from lmstack.world import World

TrainFn = Callable[[PretrainConfig], dict[str, Any]]


def _quiet_pretrain(pcfg: PretrainConfig) -> dict[str, Any]:
    return pretrain(pcfg, log=lambda _: None)


def world_data(cfg: ScalingConfig) -> dict[str, Any]:
    """Write the world's pretraining corpus (train docs, then val docs) once into <out>/data/world.txt; return the
    data overrides that read it character-level with the val docs as the held-out tail."""
    path = Path(cfg.out) / "data" / "world.txt"
    meta_path = path.with_suffix(".json")
    want = {"people": cfg.world_people, "seed": cfg.world_seed}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if not path.exists() or {k: meta.get(k) for k in want} != want:
        docs = World(seed=cfg.world_seed, n_people=cfg.world_people).corpus("pretrain")
        train = "\n\n".join(d["text"] for d in docs if d["split"] == "train")
        val = "\n\n".join(d["text"] for d in docs if d["split"] == "val")
        text = train + "\n\n" + val
        vocab = train_tokenizer(texts=[text], type="char").vocab_size
        atomic_write_text(path, text)
        meta = {**want, "chars": len(text), "val_chars": len(val) + 2, "vocab_size": vocab}
        atomic_write_text(meta_path, json.dumps(meta) + "\n")
    return {"data.text": str(path), "data.tokenizer": "char", "data.shards": "",
            "data.val_fraction": meta["val_chars"] / meta["chars"], "model.vocab_size": meta["vocab_size"]}


def train_tokens(pcfg: PretrainConfig) -> int | None:
    """Tokens in a run's training split, when they can be known without tokenizing: char-level text, or shards."""
    d = pcfg.data
    if d.text and d.tokenizer == "char":
        chars = len(Path(d.text).read_text(encoding="utf-8"))
        return int(chars * (1 - d.val_fraction))
    if d.shards:
        return int(ShardSet(d.shards).n_tokens)
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The finished runs in runs.jsonl (none before the first); a bad line is an error naming the file and line."""
    return read_jsonl(path) if path.exists() else []


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """Append by rewriting the whole file atomically: a crash leaves the old file or the new, never half a row."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(row) + "\n")


def run_one(run: PlannedRun, pcfg: PretrainConfig, rows_path: Path, train: TrainFn,
            log: Callable[[str], Any], epochs_of: Callable[[PretrainConfig], int | None]) -> dict[str, Any]:
    """Train one planned run unless runs.jsonl already holds it (same name and config); return its row."""
    digest = config_hash(pcfg)
    for row in read_rows(rows_path):
        if row["name"] == run.name:
            if row["config_hash"] != digest:
                raise LmstackError(f"{rows_path} holds run {run.name} trained with another config; give a new "
                                   f"`out` (or remove that row and runs/{run.name}/) to train it again")
            log(f"scaling: {run.name} already finished (val_loss {row['val_loss']:.4f}), skipped")
            return row
    log(f"scaling: {run.name}: N={run.n_params:,} D={run.tokens:,} ({run.steps} steps)")
    start = time.perf_counter()
    summary = train(pcfg)
    seconds = time.perf_counter() - start
    val = summary.get("val_loss")
    if val is None or not math.isfinite(float(val)):
        raise LmstackError(f"scaling run {run.name} gave no finite val_loss ({val}); the grid is fitted on the "
                           f"validation loss, so the data needs a validation split")
    split = epochs_of(pcfg)
    row = {"name": run.name, "kind": run.kind, "size": run.size, "n_params": run.n_params,
           "total_params": run.total_params, "non_embedding_params": run.non_embedding_params,
           "tokens": int(summary.get("tokens_seen") or run.tokens), "planned_tokens": run.tokens,
           "steps": run.steps, "budget": run.budget, "flops_6nd": run.flops_6nd, "flops": run.flops,
           "val_loss": float(val), "train_loss": summary.get("final_loss"), "seconds": round(seconds, 2),
           "epochs": round(run.tokens / split, 4) if split else None, "config_hash": digest}
    _append_row(rows_path, row)
    log(f"scaling: {run.name}: val_loss {row['val_loss']:.4f} in {seconds:.1f}s")
    return row


def _frontier(fn: Callable, runs: list[Run]) -> dict[str, Any]:
    try:
        k, a, points = fn(runs)
    except LmstackError as e:  # descriptive only: a grid without interior minima still has the law's frontier
        return {"error": str(e)}
    return {"k": k, "a": a, "points": [list(p) for p in points]}


def analyse(rows: list[dict[str, Any]], at_flops: float, n_boot: int, seed: int) -> dict[str, Any]:
    """The three frontier estimates, the law and its bootstrap intervals from the grid's rows."""
    runs = [Run(r["n_params"], r["tokens"], r["val_loss"]) for r in rows]
    law = fit_chinchilla(runs)
    rel = [float(law.loss(r.n_params, r.tokens) / r.loss - 1) for r in runs]
    n_opt, d_opt = law.optimal(at_flops)
    return {"law": law.to_dict(), "n_runs": len(runs),
            "fit_rel_error": {"mean_abs": float(np.mean(np.abs(rel))), "max_abs": float(np.max(np.abs(rel)))},
            "exponents": {"approach1": None, "approach2": None, "approach3": law.exponent},
            "approach1": _frontier(frontier_minima, runs), "approach2": _frontier(isoflop_parabolas, runs),
            "at_flops": at_flops, "optimal": {"n_params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt},
            "bootstrap": {k: list(v) for k, v in bootstrap(runs, n_boot=n_boot, seed=seed, at_flops=at_flops, law=law).items()}}


def predict_one(cfg: ScalingConfig, base: dict, law: dict, c_max: float, rows_path: Path, train: TrainFn,
                log: Callable[[str], Any], epochs_of: Callable) -> dict[str, Any]:
    """Train one run at predict x c_max with the candidate size nearest the law's N*, and compare its loss."""
    fitted = ChinchillaLaw(**law)
    flops = cfg.predict * c_max
    n_star, d_star = fitted.optimal(flops)
    candidates = cfg.predict_sizes or cfg.sizes
    counted = [(count(run_config(base, s, 1, 0.0, ""), cfg.params)[0], s) for s in candidates]
    n_used, size = min(counted, key=lambda c: abs(math.log(c[0] / n_star)))
    run, pcfg = plan_run(cfg, base, size, budget=flops, kind="predict")
    row = run_one(run, pcfg, rows_path, train, log, epochs_of)
    predicted = float(fitted.loss(row["n_params"], row["tokens"]))
    measured = row["val_loss"]
    return {"factor": cfg.predict, "flops": flops, "n_star": n_star, "d_star": d_star,
            "tokens_per_param_star": d_star / n_star, "n_used": row["n_params"], "tokens_used": row["tokens"],
            "size": size, "predicted_loss": predicted, "measured_loss": measured,
            "rel_error": measured / predicted - 1, "run": row["name"]}


def run_scaling(cfg: ScalingConfig, train: TrainFn | None = None, log: Callable[[str], Any] = print
                ) -> dict[str, Any]:
    """Plan (and refuse bad input), run or resume the grid, fit, optionally predict, write report.json + plots."""
    start = time.perf_counter()
    out = Path(cfg.out)
    data = world_data(cfg) if cfg.data == "world" else {}
    base, planned = plan_grid(cfg, data)
    train = train or _quiet_pretrain
    cache: dict[str, int | None] = {}

    def epochs_of(pcfg: PretrainConfig) -> int | None:
        key = f"{pcfg.data.text}|{pcfg.data.shards}|{pcfg.data.val_fraction}"
        if key not in cache:
            cache[key] = train_tokens(pcfg)
        return cache[key]

    rows_path = out / "runs.jsonl"
    log(f"scaling: {len(planned)} grid runs, N {min(r.n_params for r, _ in planned):,}.."
        f"{max(r.n_params for r, _ in planned):,} ({cfg.params}), into {out}")
    rows = [run_one(run, pcfg, rows_path, train, log, epochs_of) for run, pcfg in planned]
    c_max = max(cfg.budgets) if cfg.budgets else max(r["flops_6nd"] for r in rows)
    fit = analyse(rows, c_max * (cfg.predict or 1.0), cfg.n_boot, cfg.seed)
    for approach in ("approach1", "approach2"):
        fit["exponents"][approach] = fit[approach].get("a")
    prediction = predict_one(cfg, base, fit["law"], c_max, rows_path, train, log, epochs_of) if cfg.predict else None
    report = {"config": to_dict(cfg), "params": cfg.params, "data": data or {"recipe": cfg.recipe},
              "train_tokens": epochs_of(planned[0][1]), "grid": rows, "fit": fit, "prediction": prediction,
              "seconds": {"total": round(time.perf_counter() - start, 2),
                          "runs": round(sum(r["seconds"] for r in rows), 2)}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    if cfg.plots:
        report["plots"] = [str(p) for p in plot_scaling(report, out)]
    return report
