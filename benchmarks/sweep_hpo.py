"""HPO at equal compute (issue 23 §1): Optuna TPE with median pruning against random search without pruning.

Every arm searches the same space (recipes/sweep.yaml: optim.lr, optim.weight_decay, model.dropout,
schedule.warmup_steps) over the same recipe (recipes/shakespeare_char.yaml, Tiny Shakespeare characters) shrunk to
CPU size: d_model 64, 2 layers, 4 heads, block 64, batch 12, `--steps` (200) training steps a trial, validation
loss on 16 batches every 25 steps (what the pruner sees) and at the end (the trial's value). One thread.

Equal compute: each sweep gets the same budget of training steps, B = --budget-trials x --steps (12 full trials).
A sweep starts trials until it has spent B; a trial counts only if it ended within B (the one that crosses B is
left out, in every arm), so each arm's best is the best COMPLETE trial's val loss after exactly <= B steps. A
pruned trial costs the steps it ran (its last report), so the pruned arms start more trials out of B.
Arms (sampler + pruner): tpe+median (ours), random (the baseline: random search, no pruning), and, to show what
each part buys, random+median and tpe. The headline arms run --headline-seeds (5) sweep seeds, the others --seeds
(3): sampler seeds; the model's own init and batches are the same in every trial. One HPO run is noise, so figures
are mean +- stderr over seeds. TPE's random startup trials draw the same points as the random arm of the same seed
(the same seeded stream), so the arms differ only where the model and the pruner act: a paired comparison.

Records (lower is better; ratio = baseline/ours as everywhere in benchmarks/, so > 1 means ours is ahead):
  best val loss at equal steps: tpe+median vs random (the headline), random+median vs random (the pruner alone),
  tpe vs random (the sampler alone), tpe+median vs tpe (the pruner on top of TPE). Each record's config has every
  arm's per-seed bests, trial-seconds (wall time of the trials, overheads included) and trials started /
  completed / pruned within the budget. Plot: best-so-far val loss against cumulative trial-seconds and steps.

Measured (2026-12-07, one shared core, budget 2400 steps = 12 full trials of 200 steps): best val loss
tpe+median 2.4567 +- 0.0039 vs random 2.4694 +- 0.0060 (n = 5 seeds; paired difference -0.013 +- 0.006, ours
lower on 4 of 5 seeds): ratio 1.005, ours/baseline 0.995, at equal trial-seconds (72.9 vs 70.6 s a sweep). What
buys it is the sampler: tpe alone -0.012 +- 0.006 vs random (n = 3); median pruning buys nothing here
(random+median equals random on all 3 seeds, tpe+median equals tpe within 0.0002). The pruner does its job
(it stops mostly low-LR trials, 59 of the 141 the median arms ran, and they start 12-22 trials instead of 12),
but the freed steps find no better point: near the optimum the landscape is a flat plateau (LR 7e-3..2e-2 with
little dropout all land at 2.45-2.48) that random search reaches within 12 trials; only TPE's sharper sampling
inside the plateau gains.

Each sweep is an lmstack sweep (run_sweep + pretrain_objective) in its own SQLite study under --work, resumed one
trial at a time until the budget is spent, so an interrupted run picks up where it stopped.

Run: flock /tmp/lmstack-bench-B.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_hpo.py
     .venv/bin/python benchmarks/sweep_hpo.py --smoke     (seconds: a tiny model, 2 seeds, no results written)
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import math
from pathlib import Path
import shutil
import statistics
import time

import optuna

from _common import RESULTS, result, write_result

from lmstack.config import atomic_save_figure, from_dict, read_mapping  # noqa: E402
from lmstack.train.pretrain import PretrainConfig  # noqa: E402
from lmstack.train.sweep import SweepConfig, pretrain_objective, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
HEADLINE = ("tpe+median", "random")
ARMS = {"tpe+median": ("tpe", "median"), "random": ("random", "none"), "random+median": ("random", "median"),
        "tpe": ("tpe", "none")}
COLORS = {"tpe+median": "C3", "random": "C0", "random+median": "C2", "tpe": "C1"}


def base_sweep(args: argparse.Namespace) -> SweepConfig:
    """recipes/sweep.yaml (its space, sampler seeds aside) with the trial shrunk to CPU size."""
    cfg = from_dict(SweepConfig, read_mapping(ROOT / "recipes" / "sweep.yaml"))
    overrides = {**cfg.overrides, "data.text": str(DATA), "model.d_model": args.d_model,
                 "model.n_layers": args.n_layers, "model.n_heads": 4, "train.steps": args.steps,
                 "train.eval_every": args.eval_every, "train.eval_batches": args.eval_batches,
                 "train.log_every": args.eval_every, "train.threads": 1, "train.progress": False, "train.seed": 0}
    return replace(cfg, recipe=str(ROOT / cfg.recipe), overrides=overrides, plots=False,
                   warmup_steps=args.prune_warmup, n_startup_trials=args.startup)


def trial_costs(out: Path, steps: int) -> list[dict]:
    """Each finished trial of the sweep in `out`, in order: state, value, steps trained, wall seconds."""
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        # a pruned trial stopped right after its last report; a complete (or failed) one is charged in full
        ran = max(t.intermediate_values) if t.state.name == "PRUNED" and t.intermediate_values else steps
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "steps": int(ran),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()})
    return rows


def run_arm_seed(base: SweepConfig, arm: str, seed: int, budget: int, steps: int, work: Path) -> list[dict]:
    """One sweep of `arm` with sampler seed `seed`, one trial at a time until `budget` steps are spent."""
    sampler, pruner = ARMS[arm]
    out = work / arm.replace("+", "_") / f"seed{seed}"
    cfg = replace(base, out=str(out), sampler=sampler, pruner=pruner, seed=seed)
    objective = pretrain_objective("val_loss")
    rows = trial_costs(out, steps) if (out / "study.db").exists() else []
    while sum(r["steps"] for r in rows) < budget:
        run_sweep(replace(cfg, n_trials=len(rows) + 1), objective, PretrainConfig,
                  log=lambda line: print(f"  {arm} s{seed} {line}", flush=True))
        rows = trial_costs(out, steps)
        shutil.rmtree(out / "trials", ignore_errors=True)  # checkpoints of finished trials: not needed
    return rows


def within_budget(rows: list[dict], budget: int) -> dict:
    """The sweep cut at `budget` steps: its trials that ended within it, their counts, the best-so-far curve."""
    spent, seconds, kept, curve, best = 0, 0.0, [], [], math.inf
    for r in rows:
        if spent + r["steps"] > budget:
            break
        spent, seconds = spent + r["steps"], seconds + r["seconds"]
        kept.append(r)
        if r["state"] == "COMPLETE":
            best = min(best, r["value"])
        curve.append([spent, round(seconds, 2), None if best == math.inf else round(best, 5)])
    return {"best": None if best == math.inf else best, "steps": spent, "trial_seconds": round(seconds, 1),
            "started": len(kept), "completed": sum(r["state"] == "COMPLETE" for r in kept),
            "pruned": sum(r["state"] == "PRUNED" for r in kept), "failed": sum(r["state"] == "FAIL" for r in kept),
            "curve": curve}


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def summarise(cut: dict[int, dict]) -> dict:
    bests = [c["best"] for c in cut.values()]
    mean, se = mean_se(bests)
    return {"best_val_loss_mean": round(mean, 4), "best_val_loss_stderr": round(se, 4), "n_seeds": len(bests),
            "best_val_loss_per_seed": [round(b, 4) for b in bests],
            "trial_seconds_mean": round(statistics.fmean(c["trial_seconds"] for c in cut.values()), 1),
            "trial_seconds_per_seed": [c["trial_seconds"] for c in cut.values()],
            "steps_per_seed": [c["steps"] for c in cut.values()],
            **{f"trials_{k}_per_seed": [c[k] for c in cut.values()] for k in ("started", "completed", "pruned",
                                                                               "failed")}}


def plot(cuts: dict[str, dict[int, dict]], budget: int, path: Path) -> Path:
    import matplotlib  # lazy: plotting only, after the sweeps

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as matplotlib above

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    grid = list(range(0, budget + 1, max(budget // 100, 1)))
    for arm, cut in cuts.items():
        for i, c in enumerate(cut.values()):
            pts = [(s, b) for _, s, b in c["curve"] if b is not None]
            left.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=COLORS[arm], alpha=0.6, lw=1,
                      label=arm if i == 0 else None)
        # the mean over seeds of the best-so-far at each step count (once every seed has a complete trial)
        means = []
        for g in grid:
            at = [next((b for s, _, b in reversed(c["curve"]) if s <= g and b is not None), None)
                  for c in cut.values()]
            means.append(statistics.fmean(at) if None not in at else float("nan"))
        right.plot(grid, means, color=COLORS[arm], label=f"{arm} (mean of {len(cut)} seeds)")
    left.set(xlabel="cumulative trial-seconds", ylabel="best val loss so far", title="each sweep seed")
    right.set(xlabel="cumulative training steps", ylabel="best val loss so far", title=f"equal budget: {budget} steps")
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--headline-seeds", type=int, default=5, help="sweep seeds of tpe+median and random (>= --seeds)")
    ap.add_argument("--steps", type=int, default=200, help="training steps of a full trial")
    ap.add_argument("--budget-trials", type=int, default=12, help="the budget, in full trials' steps")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--prune-warmup", type=int, default=50, help="median: no pruning before this step")
    ap.add_argument("--startup", type=int, default=5, help="TPE random startup trials; median: trials before pruning")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_sweep_hpo"))
    ap.add_argument("--smoke", action="store_true", help="a tiny run that writes no results")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.headline_seeds, args.steps, args.budget_trials = 2, 2, 20, 3
        args.eval_every, args.eval_batches = 5, 2
        args.prune_warmup, args.startup, args.d_model, args.n_layers = 5, 1, 32, 1
        args.work = str(Path(args.work) / "smoke")
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown or "random" not in arms or "tpe+median" not in arms:
        ap.error(f"--arms must include tpe+median and random, from {', '.join(ARMS)}; unknown: {sorted(unknown)}")
    budget = args.budget_trials * args.steps
    base, work = base_sweep(args), Path(args.work)
    cuts: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    start = time.perf_counter()
    for seed in range(max(args.seeds, args.headline_seeds)):  # seeds outermost: a partial run compares every arm
        for arm in arms:
            if seed >= (args.headline_seeds if arm in HEADLINE else args.seeds):
                continue
            rows = run_arm_seed(base, arm, seed, budget, args.steps, work)
            cuts[arm][seed] = c = within_budget(rows, budget)
            print(f"{arm:14s} seed {seed}: best {c['best']} | {c['started']} trials ({c['completed']} complete, "
                  f"{c['pruned']} pruned) in {c['steps']} steps, {c['trial_seconds']} trial-s "
                  f"[{time.perf_counter() - start:.0f}s]", flush=True)
    arms_summary = {arm: summarise(cut) for arm, cut in cuts.items()}
    for arm, s in arms_summary.items():
        print(f"{arm:14s} best val loss {s['best_val_loss_mean']:.4f} +- {s['best_val_loss_stderr']:.4f} "
              f"(n={s['n_seeds']}), {s['trial_seconds_mean']} trial-s, started {s['trials_started_per_seed']}, "
              f"pruned {s['trials_pruned_per_seed']}")
    if args.smoke:
        print("smoke run: no results written")
        return
    config = {"recipe": "recipes/shakespeare_char.yaml via recipes/sweep.yaml", "space": base.space,
              "model": f"d_model {args.d_model}, {args.n_layers} layers, 4 heads, block 64, batch 12 (chars)",
              "steps_per_trial": args.steps, "budget_steps": budget, "budget_full_trials": args.budget_trials,
              "eval_every": args.eval_every, "eval_batches": args.eval_batches, "median_warmup_steps":
              args.prune_warmup, "n_startup_trials": args.startup,
              "seeds": {arm: len(cuts[arm]) for arm in arms}, "threads": 1,
              "equal_compute": "same training-step budget per sweep; trials crossing it are left out in every arm",
              "ratio_note": "ratio = baseline/ours (benchmarks convention): > 1 means lower val loss than baseline",
              "arms": arms_summary}
    # [steps, trial-seconds, best so far] after each trial of each sweep; in the headline record only
    curves = {arm: {str(s): c["curve"] for s, c in cut.items()} for arm, cut in cuts.items()}
    records = []
    pairs = [("tpe+median", "random", "TPE + median pruning vs random search (the headline)"),
             ("random+median", "random", "what the pruner alone buys"),
             ("tpe", "random", "what the sampler alone buys"),
             ("tpe+median", "tpe", "what the pruner buys on top of TPE")]
    for ours, base_arm, what in pairs:
        if ours not in cuts or base_arm not in cuts:
            continue
        seeds = sorted(set(cuts[ours]) & set(cuts[base_arm]))  # paired: the seeds both arms ran
        (o, o_se), (b, b_se) = (mean_se([cuts[arm][s]["best"] for s in seeds]) for arm in (ours, base_arm))
        wins = sum(cuts[ours][s]["best"] < cuts[base_arm][s]["best"] for s in seeds)
        ties = sum(cuts[ours][s]["best"] == cuts[base_arm][s]["best"] for s in seeds)
        diff, diff_se = mean_se([cuts[ours][s]["best"] - cuts[base_arm][s]["best"] for s in seeds])
        records.append(result("sweep_hpo", "best_val_loss_at_equal_steps", False, round(o, 4),
                              f"{base_arm} ({ARMS[base_arm][0]} sampler, pruner {ARMS[base_arm][1]})", round(b, 4),
                              goal=1.0, ours_arm=ours, what=what, n_seeds=len(seeds), ours_stderr=round(o_se, 4),
                              baseline_stderr=round(b_se, 4), seeds_won_tied=[wins, ties],
                              paired_diff_mean=round(diff, 4), paired_diff_stderr=round(diff_se, 4),
                              ours_over_baseline=round(o / b, 4), **config, **({} if records else {"curves": curves})))
    plot(cuts, budget, RESULTS / "sweep_hpo.png")
    write_result("sweep_hpo", records)


if __name__ == "__main__":
    main()
