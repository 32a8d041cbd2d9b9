"""Run the server's bad-input matrix (tests/serve/test_bad_input_matrix.py) once against live servers and
count the outcomes -> results/hardening_matrix.json.

Each case is handled when it comes back as expected (a 4xx JSON error in OpenAI's shape, or a correct 200
for valid input), the keep-alive connection still works, /health answered within the test's limit all
through it (250 ms for the heavy, large-list cases, whose median and worst over 5 runs each are also
reported against issue 15's 100 ms target; 1 s for the rest), and the engine is idle again without a
failed step. Then a greedy stream and chat run beside the engine-poisoning cases: their text must equal a
lone greedy run. The baseline is the same matrix against the code before issue 15's fixes (PRE_FIX_COMMIT,
unpacked with git archive and run in a fresh process); the campaign's own count was 109 of 122.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/hardening_matrix.py            # ~5 min on 2 busy cores (both runs)
    python benchmarks/hardening_matrix.py --only surrogate             # ids containing a substring
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import result, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
HEAVY_REPEATS = 4  # extra runs of each heavy case, for a latency median and max over more than one sample
PRE_FIX_COMMIT = "1e39711"  # the tree before issue 15's fixes: the baseline runs the same matrix against it


def tiny_model_dir(root: Path) -> Path:
    """The same tiny random llama + 300-token BPE as tests/serve/conftest.py's model_dir fixture."""
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer
    from serve_helpers import make_text

    tok = train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    path = root / "tiny-llama"
    lmstack.save_model(lmstack.Transformer(cfg).eval(), path, tokenizer=tok)
    return path


def run_matrix(only: str | None, heavy_repeats: int) -> dict:
    """Every case (or those whose id contains `only`) once, the heavy ones `heavy_repeats` more times, then
    the healthy stream beside the poisoned requests; a summary of the outcomes."""
    import torch

    torch.set_num_threads(1)
    from test_bad_input_matrix import CASES, ServerPool, poisoned_beside_healthy, run_case

    cases = [c for c in CASES if only is None or only in c.id]
    heavy = [c for c in cases if c.heavy]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        pool = ServerPool(model_dir)
        outcomes, start = [], time.perf_counter()
        try:
            for case in cases:
                out = run_case(pool.get(case.auth), case)
                outcomes.append(out)
                mark = "ok " if not out["problems"] else "BAD"
                print(f"{mark} {case.id:45s} {out['status']} health {out['health_worst_s']:.3f}s "
                      f"{'; '.join(out['problems'])[:150]}", flush=True)
            seconds = time.perf_counter() - start
            # One pass is one sample of a noisy machine: the heavy cases run again (round-robin), and their
            # /health latency is reported as the median and the max of every run.
            heavy_reps = {o["id"]: [o["health_worst_s"]] for o in outcomes if o["id"] in {c.id for c in heavy}}
            for _ in range(heavy_repeats):
                for case in heavy:
                    heavy_reps[case.id].append(run_case(pool.get(case.auth), case)["health_worst_s"])
        finally:
            pool.close()
        healthy = poisoned_beside_healthy(model_dir) if only is None else None
    summary = {
        "cases": len(outcomes), "handled": sum(not o["problems"] for o in outcomes),
        "server_5xx": sum(o["status"] is not None and o["status"] >= 500 for o in outcomes),
        "unanswered": sum(o["status"] is None for o in outcomes),
        "health_worst_s": max(o["health_worst_s"] for o in outcomes),
        "per_case_worst": {o["id"]: o["health_worst_s"] for o in outcomes if o["health_worst_s"] > 0.1},
        "heavy_runs": heavy_reps, "failing": {o["id"]: "; ".join(o["problems"])[:200] for o in outcomes
                                              if o["problems"]},
        "seconds": round(seconds, 1), "healthy": healthy}
    print(f"{summary['handled']}/{summary['cases']} handled, {summary['server_5xx']} answered 5xx, "
          f"{summary['unanswered']} unanswered, worst /health {summary['health_worst_s']:.3f} s, {seconds:.0f} s")
    return summary


def pre_fix_summary(commit: str) -> dict:
    """The same matrix against `commit`'s src/ (git archive into a temp dir; a fresh process imports it)."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = Path(tmp) / "summary.json"
        subprocess.run([sys.executable, __file__, "--src", str(Path(tmp) / "src"), "--summary_json", str(out)],
                       check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="run only the cases whose id contains this (no JSON written)")
    ap.add_argument("--pre_fix_commit", default=PRE_FIX_COMMIT,
                    help="also run the matrix against this commit's src/ (the baseline); '' skips it")
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)           # internal: the pre-fix run
    ap.add_argument("--summary_json", default=None, help=argparse.SUPPRESS)  # internal: where it writes
    args = ap.parse_args()
    if args.src is not None:
        sys.path.insert(0, args.src)  # before anything imports lmstack
        summary = run_matrix(None, heavy_repeats=0)
        used = sys.modules["lmstack"].__file__
        assert used.startswith(args.src), f"the pre-fix run imported {used}, not {args.src}"
        Path(args.summary_json).write_text(json.dumps(summary))
        return
    from test_bad_input_matrix import HEALTH_LIMIT_S, HEAVY_HEALTH_LIMIT_S, HEAVY_HEALTH_TARGET_S, POISON

    if args.only is not None:
        run_matrix(args.only, heavy_repeats=0)
        return
    before = pre_fix_summary(args.pre_fix_commit) if args.pre_fix_commit else None
    now = run_matrix(None, heavy_repeats=HEAVY_REPEATS)
    healthy = now["healthy"]
    heavy_all = [x for reps in now["heavy_runs"].values() for x in reps]
    poison_5xx = sorted(k for k, v in healthy["poison_statuses"].items() if not isinstance(v, int) or v >= 500)
    config = dict(machine="2 cores, shared", model="random llama-tiny, 300-token BPE, context 256",
                  max_num_seqs=8, health_limit_s=HEALTH_LIMIT_S, heavy_health_limit_s=HEAVY_HEALTH_LIMIT_S,
                  seconds=now["seconds"], load_average_1min=round(os.getloadavg()[0], 2))
    pre = {} if before is None else {
        "pre_fix_commit": args.pre_fix_commit, "pre_fix_handled": before["handled"],
        "pre_fix_server_5xx": before["server_5xx"], "pre_fix_unanswered": before["unanswered"],
        "pre_fix_failing": before["failing"],
        "pre_fix_stream_identical": before["healthy"]["stream_identical"],
        "pre_fix_note": "a case that stalls its server (no /health) is abandoned after its 60 s timeout and a "
                        "fresh server takes over; the stalled thread may keep a core busy during later cases"}
    baseline = ("pre-fix code", round(before["handled"] / before["cases"], 4)) if before else \
        ("issue-15 campaign", round(109 / 122, 4))
    write_result("hardening_matrix", [
        result("hardening_matrix", "handled_fraction", True, now["handled"] / now["cases"], *baseline, goal=1.0,
               cases=now["cases"], handled=now["handled"], server_5xx=now["server_5xx"],
               unanswered=now["unanswered"], failing=now["failing"], campaign_handled="109 of 122", **pre,
               **config),
        result("hardening_matrix", "health_worst_latency_s", False, now["health_worst_s"], "limit", HEALTH_LIMIT_S,
               goal=HEALTH_LIMIT_S, per_case_worst=now["per_case_worst"]),
        result("hardening_matrix", "heavy_health_worst_latency_s", False, max(heavy_all), "issue-15 target",
               HEAVY_HEALTH_TARGET_S, goal=HEAVY_HEALTH_TARGET_S, test_limit_s=HEAVY_HEALTH_LIMIT_S,
               runs_per_case=1 + HEAVY_REPEATS, per_case_runs=now["heavy_runs"]),
        result("hardening_matrix", "heavy_health_median_latency_s", False, statistics.median(heavy_all),
               "issue-15 target", HEAVY_HEALTH_TARGET_S, goal=HEAVY_HEALTH_TARGET_S,
               runs=len(heavy_all), over_target=sum(x > HEAVY_HEALTH_TARGET_S for x in heavy_all)),
        result("hardening_matrix", "healthy_stream_identical", True, float(healthy["stream_identical"]),
               "lone greedy run", 1.0, goal=1.0, chat_identical=healthy["chat_identical"],
               poison_cases=len(POISON), poison_5xx=poison_5xx, **config),
    ])


if __name__ == "__main__":
    main()
