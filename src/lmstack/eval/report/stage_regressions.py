"""The regressions-between-stages table: every metric with a stderr, from each stage to the next that
measured it (eval_<stage>.json in the order the stages ran, then align/scores.json's SFT -> aligned), flagged
when it got worse by more than the stderr of the difference, sqrt(se_before^2 + se_after^2).

Usage:
    from lmstack.eval.report.stage_regressions import regressions, stage_measurements
    rows = regressions(stage_measurements(Path("runs/x"), evals))
    [r["metric"] for r in rows if r["flagged"]]
"""
from __future__ import annotations

import math
from pathlib import Path

from lmstack.eval.report.common import fmt_num, fmt_score, read_json


LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "ece", "loss", "benign_refusal")
"""Name parts of metrics where a rise is the regression (used when a result does not say itself)."""


def _higher_is_better(metric: str, stated: dict | None = None) -> bool:
    if isinstance(stated, dict) and isinstance(stated.get(metric), bool):
        return stated[metric]
    return not any(part in metric for part in LOWER_IS_BETTER)


def stage_measurements(run: Path, evals: dict[str, dict]) -> list[tuple[str, dict[str, tuple[float, float, bool]]]]:
    """[(stage, {metric: (value, stderr, higher is better)})] in the order the stages ran: the eval_<stage>.json
    files, then align/scores.json's SFT and aligned columns. Only metrics that carry a stderr are kept."""
    out = []
    for stage, results in evals.items():
        got = {}
        for task, res in results.items():
            if not isinstance(res, dict) or res.get("skipped"):
                continue
            m = res.get("metrics") or {}
            for metric, value in m.items():
                err = m.get(f"{metric}_stderr")
                if metric.endswith("_stderr") or fmt_num(value) == "—" or fmt_num(err) == "—":
                    continue
                got[f"{task} {metric}"] = (float(value), float(err), _higher_is_better(metric, res.get("higher_is_better")))
        out.append((stage, got))
    scores = (read_json(run / "align" / "scores.json") or {}).get("scores")
    if isinstance(scores, dict):
        for stage in ("sft", "aligned"):
            s = scores.get(stage) if isinstance(scores.get(stage), dict) else {}
            got = {f"{k} (align/scores.json)": (float(v), float(s[f"{k}_stderr"]), _higher_is_better(k))
                   for k, v in s.items() if not k.endswith("_stderr") and fmt_num(v) != "—"
                   and fmt_num(s.get(f"{k}_stderr")) != "—"}
            out.append((f"{stage} (align stage)", got))
    return out


def regressions(measured: list[tuple[str, dict]], z: float = 1.0) -> list[dict]:
    """For every metric, each pair of consecutive stages that measured it: the two values, their stderrs, and
    flagged = it got worse by more than z x sqrt(se_before^2 + se_after^2), the stderr of the difference."""
    rows, seen = [], {}
    for stage, metrics in measured:
        for metric, (value, err, higher) in metrics.items():
            if metric in seen:
                prev_stage, (pv, pe, _) = seen[metric]
                se = math.hypot(pe, err)
                worse = (pv - value) if higher else (value - pv)
                rows.append({"metric": metric, "from": prev_stage, "to": stage, "before": pv, "before_se": pe,
                             "after": value, "after_se": err, "worse_by": worse, "se_diff": se,
                             "flagged": worse > z * se if se > 0 else worse > 0})
            seen[metric] = (stage, (value, err, higher))
    return rows


def section_regressions(run: Path, evals: dict[str, dict]) -> list[str]:
    rows = regressions(stage_measurements(run, evals))
    if not rows:
        return ["_No metric was measured, with a stderr, by two stages: nothing to compare._", ""]
    flagged = [r for r in rows if r["flagged"]]
    lines = [f"Every metric measured with a stderr by two consecutive stages. **Flagged** when it got worse by more "
             f"than the stderr of the difference, sqrt(se_before² + se_after²) (for lower-is-better metrics such as "
             f"perplexity, bits per byte, ECE and over-refusal, worse means higher). "
             f"{len(flagged)} of {len(rows)} flagged.", "",
             "| metric | from → to | before ± se | after ± se | change | flag |", "|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: not r["flagged"]):
        change = r["after"] - r["before"]
        flag = ("**⚠ worse beyond stderr**" if r["flagged"] else
                "worse, within stderr" if r["worse_by"] > 0 else "not worse")
        lines.append(f"| {r['metric']} | {r['from']} → {r['to']} | {fmt_score(r['before'])} ± {fmt_score(r['before_se'])} | "
                     f"{fmt_score(r['after'])} ± {fmt_score(r['after_se'])} | {change:+.4g} | {flag} |")
    return lines + [""]
