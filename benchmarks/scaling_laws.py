"""Scaling laws (issue 23 §2): fit Chinchilla's L(N, D) on a grid of small runs, then predict one run 4x past it.

Runs recipes/scaling.yaml with `lmstack scaling` (lmstack.train.scaling): character-level GPT-2 style models on
the synthetic world's pretraining corpus (6000 people, 13.2 M training characters, so no run sees its data more
than once), 6 sizes x 3 IsoFLOP budgets 5e11..2e12 (the points with 1.5..300 tokens per parameter: 12 runs, N =
25k..443k non-embedding parameters; 5M was beyond the 35-minute single-core budget), each trained with a cosine
schedule that ends at its own D, batch 8 x 64. On those runs it fits the law (Huber on log-loss, L-BFGS), both
frontier estimates and bootstrap intervals, then trains ONE run at 4x the largest budget with the law's
compute-optimal size (the grid size nearest N* in log N) and compares its val loss with the law's prediction at
that N and D.

Record (lower is better): |measured / predicted - 1| of the prediction run; goal 0.02 (the issue's 2%).
Baseline: the Kaplan-style compute law L(C) = k C^-g fitted in log-log to the best loss of each budget (approach
1's minima), extrapolated to the same compute: what one predicts without separating N from D.
The fit, its intervals, the frontier exponents of approaches 1/2/3, tokens per parameter, every run's row (with
its epochs over the training split), seconds, and earlier attempts with other grids are in the record's config.

Measured (2026-12-07, one seed, one core): the goal is MISSED. Batch 8, 3 budgets: the law (E 0.175, alpha 0.63,
beta 1.18; in-sample mean |error| 5.2%, max 27%) predicts 0.345 at N=197k, D=6.76M (8e12 FLOPs); measured 0.425:
+22.9% (the L(C) baseline predicts 0.296: 43% off). Bootstrap 90%: alpha 0.52..0.74, beta 0.98..1.26, tokens per
parameter at 8e12 20..52 (point 38); frontier exponents a = 0.58 / 0.44 / 0.65 (approaches 1 / 2 / 3).
The first attempt (batch 32, 4 budgets 5e11..4e12, 16 runs) missed by +53.6% (predicted 0.265, measured 0.407;
in-sample error 12%, E -> 0): at batch 32 these runs have 200..800 steps and are optimisation-limited (the 98k
model at 846k tokens reaches val loss 1.93 at batch 32 and 1.07 at batch 8), which no L(N, D) describes; the
redesign was chosen from that diagnosis, and its miss is kept in `earlier_attempts`. Even at batch 8 the
shortest runs (825..1650 steps) sit on the steep drop where the model learns to copy names within a document
(the world's bios repeat them), so the fitted beta is steep and the law under-predicts the longer run. Budgets
large enough that every run has several thousand steps would be the next thing to try; they need more than
this benchmark's CPU budget.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_laws.py           (about 12 minutes on one core;
     resumable: finished runs are kept in runs/scaling_laws/runs.jsonl)
     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_laws.py --smoke   (a tiny grid, under a minute; writes no result)
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import math
from pathlib import Path

import numpy as np

from _common import RESULTS, result, write_result

from lmstack.config import load_config  # noqa: E402
from lmstack.train.scaling import ScalingConfig, run_scaling  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "scaling.yaml"
SMOKE = dict(world_people=100, sizes=[{"d_model": 16, "n_layers": 1, "n_heads": 2},
                                      {"d_model": 24, "n_layers": 1, "n_heads": 2},
                                      {"d_model": 32, "n_layers": 1, "n_heads": 2}],
             budgets=[1e9, 2e9, 4e9], min_tokens_per_param=0.0, max_tokens_per_param=0.0, min_steps=10, n_boot=20)


def compute_law_baseline(rows: list[dict], flops: float) -> tuple[float, dict]:
    """The best val loss of each budget, fitted as L = k C^-g in log-log and read at `flops`."""
    best: dict[float, float] = {}
    for r in rows:
        if r.get("budget"):
            best[r["budget"]] = min(best.get(r["budget"], math.inf), r["val_loss"])
    c = np.array(sorted(best))
    slope, log_k = np.polyfit(np.log(c), np.log([best[x] for x in c]), 1)
    return float(math.exp(log_k) * flops ** slope), {"k": float(math.exp(log_k)), "g": float(-slope),
                                                     "minima": {f"{x:.3g}": best[x] for x in c}}


def earlier_attempts(path: Path, record: dict) -> list[dict]:
    """The previous result's headline (and its own earlier ones) when it came from another grid: a redesign after
    a miss keeps the miss on record instead of overwriting it."""
    if not path.exists():
        return []
    prev = json.loads(path.read_text())[0]
    keys = ("budgets", "sizes", "overrides")
    if all(prev["config"].get(k) == record["config"].get(k) for k in keys):
        return prev["config"].get("earlier_attempts", [])
    keep = ("measured_over_predicted", "prediction", "law", "fit_rel_error", "frontier_exponents", "budgets",
            "overrides", "n_grid_runs", "grid_params_range", "seconds", "recipe")
    head = {"date": prev["date"], "ours": prev["ours"], "baseline": prev["baseline"],
            **{k: prev["config"][k] for k in keep if k in prev["config"]}}
    return prev["config"].get("earlier_attempts", []) + [head]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny grid (seconds); writes no result")
    ap.add_argument("--out", default="", help="run directory (default runs/scaling_laws, or /tmp for --smoke)")
    args = ap.parse_args()
    cfg = load_config(ScalingConfig, RECIPE)
    root = Path(__file__).resolve().parents[1]
    cfg = replace(cfg, recipe=str(root / cfg.recipe), overrides={**cfg.overrides, "train.threads": 1})
    name = "scaling_laws"
    if args.smoke:
        cfg = replace(cfg, **SMOKE, overrides={**cfg.overrides, "data.batch_size": 8, "data.seq_len": 32})
        name = "scaling_laws_smoke"
    cfg = replace(cfg, out=args.out or (f"/tmp/{name}" if args.smoke else str(root / "runs" / name)))
    report = run_scaling(cfg)
    fit, pred = report["fit"], report["prediction"]
    base_loss, base_fit = compute_law_baseline(report["grid"], pred["flops"])
    ours = abs(pred["rel_error"])
    baseline = abs(pred["measured_loss"] / base_loss - 1)
    rows = [{k: r[k] for k in ("name", "n_params", "total_params", "tokens", "steps", "budget", "flops_6nd",
                               "flops", "val_loss", "train_loss", "seconds", "epochs")} for r in report["grid"]]
    grid_n = sorted({r["n_params"] for r in rows})
    record = result(
        name, "prediction_abs_rel_error", False, round(ours, 5), "L(C) power law on per-budget minima",
        round(baseline, 5), goal=0.02,
        measured_over_predicted=round(pred["measured_loss"] / pred["predicted_loss"], 5),
        prediction=pred, baseline_prediction={"loss": base_loss, **base_fit},
        law=fit["law"], fit_rel_error=fit["fit_rel_error"], bootstrap_90=fit["bootstrap"],
        frontier_exponents=fit["exponents"], approach1=fit["approach1"], approach2=fit["approach2"],
        tokens_per_param_at_prediction=fit["optimal"]["tokens_per_param"], optimal_at_prediction=fit["optimal"],
        params="non-embedding" if cfg.params == "non_embedding" else "total",
        grid_params_range=[grid_n[0], grid_n[-1]], n_grid_runs=len(rows),
        data=f"world corpus ({cfg.world_people} people), character-level; train split {report['train_tokens']:,} "
             f"tokens", runs=rows, seconds=report["seconds"],
        recipe=str(RECIPE.relative_to(root)), budgets=cfg.budgets, sizes=cfg.sizes,
        overrides={k: v for k, v in cfg.overrides.items() if k != "train.threads"})
    record["config"]["earlier_attempts"] = earlier_attempts(RESULTS / f"{name}.json", record)
    if args.smoke:  # a smoke run checks the pipeline; its numbers are not a result
        print(f"smoke: ours {ours:.4f} baseline {baseline:.4f} (not written)")
    else:
        write_result(name, [record])
        for png in ("loss_vs_flops.png", "isoflop.png", "frontier.png"):
            (RESULTS / f"scaling_laws_{png}").write_bytes((Path(cfg.out) / png).read_bytes())
    print(f"prediction: N={pred['n_used']:,} D={pred['tokens_used']:,} predicted {pred['predicted_loss']:.4f} "
          f"measured {pred['measured_loss']:.4f} ({100 * pred['rel_error']:+.2f}%); baseline {base_loss:.4f}")


if __name__ == "__main__":
    main()
